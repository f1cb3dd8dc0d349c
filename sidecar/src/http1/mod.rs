//! HTTP/1.1 as the proxy speaks it on both sides: heads parsed by `httparse` and rewritten for
//! the next hop ([`head`]), bodies relayed as they arrive ([`body`]). No header map, no body
//! channel, no task per connection to an instance: the client connection's task does it all.

pub mod body;
pub mod head;
