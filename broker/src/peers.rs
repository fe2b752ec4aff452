//! One lazily connected channel per broker address, reused: the broker forwards through it and the client
//! library talks to brokers through it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use flotilla_proto::broker::flotilla_client::FlotillaClient;
use tonic::transport::{Channel, Endpoint};

/// Largest message a broker client sends or accepts.
pub const MESSAGE_BYTES_MAX: usize = 64 << 20;
/// While a call is open on a connection, an HTTP/2 PING goes out this often...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// ...and a connection whose PING is not answered within this is closed, failing its calls. A broker
/// stopped by SIGSTOP (or a host gone without a reset) keeps its TCP connections open, so without this
/// a produce stream to it, and every request queued on it, would wait forever.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Cached channels to brokers, by address.
#[derive(Default)]
pub struct Peers {
    channels: Mutex<HashMap<String, Channel>>,
}

impl Peers {
    /// A client for the broker at `addr` (HOST:PORT); connects on first use. Fails only on a malformed
    /// address.
    pub fn client(&self, addr: &str) -> Result<FlotillaClient<Channel>, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match channels.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| format!("bad address {addr:?}: {e}"))?
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                    .connect_lazy();
                channels.insert(addr.to_owned(), c.clone());
                c
            }
        };
        Ok(FlotillaClient::new(channel)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX))
    }
}
