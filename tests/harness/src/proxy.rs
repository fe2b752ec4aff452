//! A fault proxy for one directed link: node A dials node B's Raft traffic through it
//! (`--raft-peer-routes`), and the harness can cut the link.
//!
//! A cut link behaves like dropped packets, not like a refused connection: open connections stall and new
//! ones are accepted and never served, so the sender only learns of the cut by its own timeouts, as with
//! `iptables -j DROP`. Healing closes the stalled connections and serves new ones again.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<watch::Sender<bool>>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on `bind` (port 0 picks one) and forwards every connection to `target`.
    pub async fn start(bind: SocketAddr, target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(watch::Sender::new(false));
        let task = tokio::spawn(accept(listener, target, cut.clone()));
        Ok(Proxy { addr, cut, task })
    }

    /// Cuts (true) or heals (false) the link.
    pub fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }

    pub fn is_cut(&self) -> bool {
        *self.cut.borrow()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, target: SocketAddr, cut: Arc<watch::Sender<bool>>) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            // Out of file descriptors, say: back off rather than spin.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let _ = inbound.set_nodelay(true);
        tokio::spawn(serve(inbound, target, cut.subscribe()));
    }
}

/// Holds a connection without serving it until the link heals, then drops it.
async fn stall(mut cut: watch::Receiver<bool>) {
    let _ = cut.wait_for(|c| !*c).await;
}

async fn serve(mut inbound: TcpStream, target: SocketAddr, mut cut: watch::Receiver<bool>) {
    let cut_now = *cut.borrow_and_update();
    if cut_now {
        return stall(cut).await;
    }
    let mut outbound = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(_) => return, // the target is down: the dialler sees the connection close
    };
    let _ = outbound.set_nodelay(true);
    let mut watcher = cut.clone();
    let was_cut = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => false,
        r = watcher.wait_for(|c| *c) => r.is_ok(),
    };
    if was_cut {
        stall(cut).await;
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
}
