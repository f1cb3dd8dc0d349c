//! The WebSocket instance's side of a socket, shared by `usher-test-server` (`GET /ws`) and
//! the sidecar's tunnel tests: each text message is answered `NAME: text`, each binary message
//! echoed as it came, until the client closes.

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Serves `ws` as instance `name` until it closes or fails.
pub async fn echo<S>(mut ws: WebSocketStream<S>, name: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(Ok(message)) = ws.next().await {
        let echo = match message {
            Message::Text(text) => Message::text(format!("{name}: {text}")),
            Message::Binary(data) => Message::Binary(data),
            _ => continue,
        };
        if ws.send(echo).await.is_err() {
            return;
        }
    }
}
