//! Tunnels: after an instance's `101 Switching Protocols` (a WebSocket handshake, RFC 6455 §4;
//! any upgrade of RFC 9110 §7.8) the client connection and the instance connection carry
//! another protocol, which the proxy does not read: it copies bytes both ways until both sides
//! have closed, either fails, nothing has moved for the idle timeout, or the sidecar shuts
//! down.
//!
//! Each direction is its own copy loop, so a side that stops reading holds up only the bytes
//! sent to it (never the other direction). A side's end of input is passed on as a half-close
//! (`shutdown(SHUT_WR)`) and the other direction goes on until its end too, for at most
//! [`HALF_CLOSED_TIMEOUT`] (HAProxy's `timeout client-fin`/`server-fin`: a peer that keeps its
//! side open after the other left would otherwise hold the tunnel for the idle timeout). The request's
//! reservation is held by the caller for the tunnel's life: a WebSocket is a request in flight
//! at its instance, counted in the load the autoscaler sees.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Bytes one direction reads at a time.
const COPY_SIZE: usize = 16 * 1024;

/// How long the other direction may stay open after one side ended its input.
pub const HALF_CLOSED_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a tunnel ended.
#[derive(Debug)]
pub enum Ended {
    /// Both sides closed their end.
    Closed,
    /// No byte moved either way for the idle timeout.
    Idle,
    /// One side ended its input and the other did not within the half-closed timeout.
    HalfClosed,
    /// The sidecar is shutting down.
    Shutdown,
    /// Reading or writing one side failed (a reset, say).
    Failed(io::Error),
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ended::Closed => f.write_str("both sides closed"),
            Ended::Idle => f.write_str("idle"),
            Ended::HalfClosed => f.write_str("one side closed and the other did not follow"),
            Ended::Shutdown => f.write_str("the sidecar is shutting down"),
            Ended::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

/// How a tunnel went: why it ended and the bytes it carried each way.
#[derive(Debug)]
pub struct Tunneled {
    pub ended: Ended,
    /// Bytes from the client to the instance.
    pub to_instance: u64,
    /// Bytes from the instance to the client.
    pub to_client: u64,
}

/// One side of a tunnel: its read and write halves and the bytes already read from it that
/// the other side must get first (read past the handshake's head).
pub struct Side<'a, R, W> {
    pub rd: &'a mut R,
    pub wr: &'a mut W,
    pub pending: &'a [u8],
}

/// How long a tunnel may wait: with no byte moving either way (`idle`), and for the second
/// side to end its input after the first did (`half_closed`).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub idle: Duration,
    pub half_closed: Duration,
}

/// Copies `client` to `instance` and back until the tunnel ends (see the module).
pub async fn run<CR, CW, IR, IW>(
    client: Side<'_, CR, CW>,
    instance: Side<'_, IR, IW>,
    timeouts: Timeouts,
    shutdown: &CancellationToken,
) -> Tunneled
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    IR: AsyncRead + Unpin,
    IW: AsyncWrite + Unpin,
{
    let activity = Activity::new();
    let to_instance = AtomicU64::new(0);
    let to_client = AtomicU64::new(0);
    let up = copy(
        client.rd,
        instance.wr,
        client.pending,
        &activity,
        &to_instance,
    );
    let down = copy(
        instance.rd,
        client.wr,
        instance.pending,
        &activity,
        &to_client,
    );
    let idle_for = async {
        loop {
            let deadline = activity.last() + timeouts.idle;
            if deadline <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::pin!(up, down, idle_for);
    let (mut up_ended, mut down_ended) = (false, false);
    let half_closed = tokio::time::sleep(Duration::MAX);
    tokio::pin!(half_closed);
    let ended = loop {
        let copied = tokio::select! {
            copied = &mut up, if !up_ended => {
                up_ended = true;
                copied
            }
            copied = &mut down, if !down_ended => {
                down_ended = true;
                copied
            }
            _ = &mut half_closed, if up_ended || down_ended => break Ended::HalfClosed,
            _ = &mut idle_for => break Ended::Idle,
            _ = shutdown.cancelled() => break Ended::Shutdown,
        };
        if let Err(e) = copied {
            break Ended::Failed(e);
        }
        if up_ended && down_ended {
            break Ended::Closed;
        }
        half_closed
            .as_mut()
            .reset(Instant::now() + timeouts.half_closed);
    };
    Tunneled {
        ended,
        to_instance: to_instance.load(Ordering::Relaxed),
        to_client: to_client.load(Ordering::Relaxed),
    }
}

/// When bytes last moved in a tunnel (both directions write it; the idle check reads it).
struct Activity {
    start: Instant,
    /// Nanoseconds from `start` to the last bytes copied.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn moved(&self) {
        let since = self.start.elapsed().as_nanos();
        self.last
            .store(u64::try_from(since).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

/// One direction: `pending` first, then whatever `rd` reads, until its end, which is passed on
/// as a half-close of `wr`.
async fn copy<R, W>(
    rd: &mut R,
    wr: &mut W,
    pending: &[u8],
    activity: &Activity,
    copied: &AtomicU64,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if !pending.is_empty() {
        wr.write_all(pending).await?;
        copied.fetch_add(pending.len() as u64, Ordering::Relaxed);
    }
    let mut buf = vec![0; COPY_SIZE];
    loop {
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            return wr.shutdown().await;
        }
        wr.write_all(&buf[..n]).await?;
        activity.moved();
        copied.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    /// Two connected loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connecting = TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, connected) = tokio::join!(listener.accept(), connecting);
        (accepted.unwrap().0, connected.unwrap())
    }

    /// A tunnel between the proxy's ends of two pairs, run in its own task; returns the far
    /// ends (the client's and the instance's) and the tunnel's task.
    async fn tunnel(
        client_pending: &'static [u8],
        instance_pending: &'static [u8],
        timeouts: Timeouts,
        shutdown: CancellationToken,
    ) -> (TcpStream, TcpStream, tokio::task::JoinHandle<Tunneled>) {
        let (mut client_near, client_far) = pair().await;
        let (mut instance_near, instance_far) = pair().await;
        let task = tokio::spawn(async move {
            let (mut crd, mut cwr) = client_near.split();
            let (mut ird, mut iwr) = instance_near.split();
            let client = Side {
                rd: &mut crd,
                wr: &mut cwr,
                pending: client_pending,
            };
            let instance = Side {
                rd: &mut ird,
                wr: &mut iwr,
                pending: instance_pending,
            };
            run(client, instance, timeouts, &shutdown).await
        });
        (client_far, instance_far, task)
    }

    fn idle(idle: Duration) -> Timeouts {
        Timeouts {
            idle,
            half_closed: Duration::from_secs(30),
        }
    }

    async fn read_exactly(stream: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        stream.read_exact(&mut buf).await.unwrap();
        buf
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_half_closes_pass_on() {
        let shutdown = CancellationToken::new();
        let (mut client, mut instance, task) = tunnel(
            b"early",
            b"greeting",
            idle(Duration::from_secs(30)),
            shutdown,
        )
        .await;
        assert_eq!(read_exactly(&mut instance, 5).await, b"early");
        assert_eq!(read_exactly(&mut client, 8).await, b"greeting");
        client.write_all(b"ping").await.unwrap();
        assert_eq!(read_exactly(&mut instance, 4).await, b"ping");
        instance.write_all(b"pong").await.unwrap();
        assert_eq!(read_exactly(&mut client, 4).await, b"pong");

        // The client is done sending; the instance sees the end and still answers.
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        instance.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        instance.write_all(b"last words").await.unwrap();
        assert_eq!(read_exactly(&mut client, 10).await, b"last words");
        drop(instance);
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());

        let tunneled = task.await.unwrap();
        assert!(
            matches!(tunneled.ended, Ended::Closed),
            "{}",
            tunneled.ended
        );
        assert_eq!(tunneled.to_instance, 9);
        assert_eq!(tunneled.to_client, 22);
    }

    #[tokio::test]
    async fn an_idle_tunnel_is_closed_and_traffic_keeps_it_open() {
        let (mut client, mut instance, task) = tunnel(
            b"",
            b"",
            idle(Duration::from_millis(300)),
            CancellationToken::new(),
        )
        .await;
        // Traffic every 100 ms for 600 ms: twice the idle timeout in all, never idle.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.write_all(b"x").await.unwrap();
            assert_eq!(read_exactly(&mut instance, 1).await, b"x");
        }
        assert!(!task.is_finished());
        let tunneled = task.await.unwrap();
        assert!(matches!(tunneled.ended, Ended::Idle), "{}", tunneled.ended);
        // Both far ends see their connection end.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        instance.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn shutdown_and_a_reset_end_the_tunnel() {
        let shutdown = CancellationToken::new();
        let (_client, _instance, task) =
            tunnel(b"", b"", idle(Duration::from_secs(30)), shutdown.clone()).await;
        shutdown.cancel();
        let tunneled = task.await.unwrap();
        assert!(
            matches!(tunneled.ended, Ended::Shutdown),
            "{}",
            tunneled.ended
        );

        let (client, mut instance, task) = tunnel(
            b"",
            b"",
            idle(Duration::from_secs(30)),
            CancellationToken::new(),
        )
        .await;
        // A reset from the client (linger 0) ends both directions, though the instance is
        // still open and silent.
        client.set_zero_linger().unwrap();
        drop(client);
        let tunneled = task.await.unwrap();
        assert!(
            matches!(tunneled.ended, Ended::Failed(_)),
            "{}",
            tunneled.ended
        );
        let mut rest = Vec::new();
        let _ = instance.read_to_end(&mut rest).await;
    }

    #[tokio::test]
    async fn a_side_left_open_after_the_other_closed_is_given_up() {
        let timeouts = Timeouts {
            idle: Duration::from_secs(30),
            half_closed: Duration::from_millis(300),
        };
        let (mut client, mut instance, task) =
            tunnel(b"", b"", timeouts, CancellationToken::new()).await;
        // The instance leaves; the client keeps its side open and says nothing.
        drop(instance.shutdown().await);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        let left = Instant::now();
        let tunneled = task.await.unwrap();
        assert!(
            matches!(tunneled.ended, Ended::HalfClosed),
            "{}",
            tunneled.ended
        );
        assert!(
            left.elapsed() >= Duration::from_millis(250),
            "{:?}",
            left.elapsed()
        );
        let _ = instance.read_to_end(&mut rest).await;
    }
}
