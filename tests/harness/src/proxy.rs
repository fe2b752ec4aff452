//! A fault proxy for one directed link: node A dials node B's Raft traffic through it
//! (`--raft-peer-routes`), and the harness can cut the link or make it slow and lossy.
//!
//! A cut link behaves like dropped packets, not like a refused connection: open connections stall and new
//! ones are accepted and never served, so the sender only learns of the cut by its own timeouts, as with
//! `iptables -j DROP`. Healing closes the stalled connections and serves new ones again.
//!
//! Packet faults (S7) are what TCP makes of them, since the proxy sees a byte stream: each chunk is
//! delivered after the link's delay plus a random jitter, never before the chunk ahead of it, and a lost
//! packet costs a retransmission timeout (200 ms, doubling while the retransmission is lost too).
//! Duplicated, reordered and corrupted packets never reach a TCP reader (the kernel drops, reorders and
//! checksums them), so on this target they are loss and delay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Delay, jitter and loss on a link.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PacketFaults {
    pub delay: Duration,
    /// Up to this much more, drawn per chunk.
    pub jitter: Duration,
    /// The chance, 0 to 1, that a packet is lost and retransmitted.
    pub loss: f64,
}

/// The first retransmission timeout of a lost packet (Linux's minimum RTO).
const RTO: Duration = Duration::from_millis(200);
/// Chunks in flight per direction before the reader waits, like a TCP window.
const WINDOW: usize = 256;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Link {
    cut: bool,
    packets: PacketFaults,
}

pub struct Proxy {
    pub addr: SocketAddr,
    link: Arc<watch::Sender<Link>>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on `bind` (port 0 picks one) and forwards every connection to `target`.
    pub async fn start(bind: SocketAddr, target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let link = Arc::new(watch::Sender::new(Link::default()));
        let task = tokio::spawn(accept(listener, target, link.clone()));
        Ok(Proxy { addr, link, task })
    }

    /// Cuts (true) or heals (false) the link.
    pub fn set_cut(&self, cut: bool) {
        self.link.send_modify(|l| l.cut = cut);
    }

    pub fn is_cut(&self) -> bool {
        self.link.borrow().cut
    }

    /// Delays and loses what crosses the link from now on (`PacketFaults::default()` for a clean link).
    pub fn set_packet_faults(&self, faults: PacketFaults) {
        self.link.send_modify(|l| l.packets = faults);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, target: SocketAddr, link: Arc<watch::Sender<Link>>) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            // Out of file descriptors, say: back off rather than spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = inbound.set_nodelay(true);
        tokio::spawn(serve(inbound, target, link.subscribe()));
    }
}

/// Holds a connection without serving it until the link heals, then drops it.
async fn stall(mut link: watch::Receiver<Link>) {
    let _ = link.wait_for(|l| !l.cut).await;
}

/// When a chunk read at `now` is delivered: after the delay and jitter and any retransmissions of a lost
/// packet, and never before `previous` (a stream keeps its order).
fn delivery(now: Instant, previous: Instant, faults: PacketFaults, rng: &mut impl Rng) -> Instant {
    let mut at = now + faults.delay;
    if !faults.jitter.is_zero() {
        at += faults.jitter.mul_f64(rng.random_range(0.0..1.0));
    }
    let mut rto = RTO;
    while faults.loss > 0.0 && rng.random_bool(faults.loss.min(0.99)) {
        at += rto;
        rto = (rto * 2).min(Duration::from_secs(3));
    }
    at.max(previous)
}

/// Copies `from` to `to`, each chunk delivered when the link's packet faults say, until either side
/// closes or the link is cut. Returns both halves, so that a cut connection stays open while it stalls,
/// and whether the link was cut (chunks still queued then are dropped, as packets on a cut link are).
async fn pump<R, W>(mut from: R, to: W, link: watch::Receiver<Link>) -> (R, Option<W>, bool)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(WINDOW);
    let mut writer_link = link.clone();
    let writer = tokio::spawn(async move {
        let mut to = to;
        while let Some((at, chunk)) = rx.recv().await {
            let written = tokio::select! {
                r = async {
                    tokio::time::sleep_until(at).await;
                    to.write_all(&chunk).await
                } => r.is_ok(),
                _ = writer_link.wait_for(|l| l.cut) => false,
            };
            if !written {
                break;
            }
        }
        to
    });
    let mut rng = StdRng::from_os_rng();
    let mut previous = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let mut watcher = link.clone();
    let cut = loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => break false,
                Ok(n) => n,
            },
            _ = watcher.wait_for(|l| l.cut) => break true,
        };
        let faults = link.borrow().packets;
        previous = delivery(Instant::now(), previous, faults, &mut rng);
        if tx.send((previous, buf[..n].to_vec())).await.is_err() {
            break link.borrow().cut;
        }
    };
    drop(tx);
    // The writer task is never aborted and does not panic, so it always hands the half back.
    let mut to = writer.await.ok();
    let cut = cut || link.borrow().cut;
    if !cut && let Some(to) = to.as_mut() {
        let _ = to.shutdown().await;
    }
    (from, to, cut)
}

async fn serve(inbound: TcpStream, target: SocketAddr, mut link: watch::Receiver<Link>) {
    let cut_now = link.borrow_and_update().cut;
    if cut_now {
        return stall(link).await;
    }
    let outbound = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(_) => return, // the target is down: the dialler sees the connection close
    };
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    let (there, back) = tokio::join!(pump(in_read, out_write, link.clone()), pump(out_read, in_write, link.clone()));
    if there.2 || back.2 {
        // Both sockets stay open, unserved, until the link heals.
        stall(link).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(s: &mut TcpStream) -> Option<Vec<u8>> {
        s.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut buf)).await.ok()?.ok()?;
        Some(buf.to_vec())
    }

    #[tokio::test]
    async fn a_cut_link_stalls_and_a_healed_one_serves_again() {
        let proxy = Proxy::start("127.0.0.1:0".parse().expect("addr"), echo_server().await).await.expect("proxy");
        let mut open = TcpStream::connect(proxy.addr).await.expect("connect");
        assert_eq!(round_trip(&mut open).await.as_deref(), Some(&b"ping"[..]));
        proxy.set_cut(true);
        assert!(proxy.is_cut());
        assert_eq!(round_trip(&mut open).await, None, "an open connection stalls");
        let mut fresh = TcpStream::connect(proxy.addr).await.expect("a cut link still accepts");
        assert_eq!(round_trip(&mut fresh).await, None, "a new connection is never served");
        proxy.set_cut(false);
        let mut healed = TcpStream::connect(proxy.addr).await.expect("connect");
        assert_eq!(round_trip(&mut healed).await.as_deref(), Some(&b"ping"[..]));
    }

    #[tokio::test]
    async fn a_slow_lossy_link_delivers_every_byte_in_order_and_no_sooner_than_its_delay() {
        let proxy = Proxy::start("127.0.0.1:0".parse().expect("addr"), echo_server().await).await.expect("proxy");
        let delay = Duration::from_millis(60);
        proxy.set_packet_faults(PacketFaults { delay, jitter: Duration::from_millis(40), loss: 0.2 });
        let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
        let sent: Vec<u8> = (0..200u32).flat_map(|i| i.to_be_bytes()).collect();
        let started = Instant::now();
        for chunk in sent.chunks(4) {
            s.write_all(chunk).await.expect("write");
        }
        let mut got = vec![0u8; sent.len()];
        tokio::time::timeout(Duration::from_secs(60), s.read_exact(&mut got)).await.expect("echoed").expect("read");
        assert_eq!(got, sent, "bytes arrive whole and in order");
        assert!(started.elapsed() >= delay * 2, "each way waits out the delay: {:?}", started.elapsed());

        proxy.set_packet_faults(PacketFaults::default());
        proxy.set_cut(true);
        assert_eq!(round_trip(&mut s).await, None, "a slow link can still be cut");
        proxy.set_cut(false);
        let mut clean = TcpStream::connect(proxy.addr).await.expect("connect");
        assert_eq!(round_trip(&mut clean).await.as_deref(), Some(&b"ping"[..]));
    }

    #[test]
    fn delivery_keeps_order_and_adds_a_retransmission_timeout_per_loss() {
        let mut rng = StdRng::seed_from_u64(1);
        let now = Instant::now();
        let clean = PacketFaults::default();
        assert_eq!(delivery(now, now, clean, &mut rng), now);
        let later = now + Duration::from_secs(5);
        assert_eq!(delivery(now, later, clean, &mut rng), later, "never before the chunk ahead");
        let lossy = PacketFaults { delay: Duration::from_millis(10), jitter: Duration::ZERO, loss: 0.5 };
        let delays: Vec<Duration> = (0..1000).map(|_| delivery(now, now, lossy, &mut rng) - now).collect();
        assert!(delays.iter().all(|d| *d >= Duration::from_millis(10)));
        let lost = delays.iter().filter(|d| **d >= Duration::from_millis(210)).count();
        assert!((350..650).contains(&lost), "about half are lost once or more: {lost}");
    }
}
