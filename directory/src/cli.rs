//! The client side of `usher-directory scale` and `usher-directory token`: one HTTP request
//! to a running directory's admin port, with the admin bearer token.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Bound on the whole exchange.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `method path` (a path with an optional query) to the admin port at `admin`, with
/// `Authorization: Bearer <bearer>` when given; returns the status and body text. Errors name
/// the address (nothing listening, timeout, broken reply).
pub async fn admin_request(
    admin: SocketAddr,
    method: Method,
    path: &str,
    bearer: Option<&str>,
) -> Result<(http::StatusCode, String), String> {
    let exchange = async {
        let stream = TcpStream::connect(admin)
            .await
            .map_err(|e| format!("cannot reach the directory's admin port {admin}: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("admin port {admin}: {e}"))?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, admin.to_string());
        if let Some(token) = bearer {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("admin port {admin}: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("admin port {admin}: {e}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| format!("admin port {admin}: no answer within {TIMEOUT:?}"))?
}

/// The request `usher-directory scale TARGET INSTANCES` sends.
pub fn scale_request(target: &str, instances: &str) -> Result<(Method, String), String> {
    if instances == "release" {
        return Ok((Method::DELETE, format!("/v1/pins/{target}")));
    }
    let n: u32 = instances
        .parse()
        .map_err(|_| format!("{instances:?} is not a number of instances or `release`"))?;
    Ok((Method::PUT, format!("/v1/pins/{target}/{n}")))
}

/// The request `usher-directory token create` sends. Errors: a role other than `agent` or
/// `sidecar`, an agent without `--service`, a sidecar with one, a service or TTL with
/// characters a query cannot carry as they are.
pub fn token_create_request(
    role: &str,
    service: Option<&str>,
    ttl: Option<&str>,
) -> Result<(Method, String), String> {
    let plain = |what: &str, v: &str| {
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            Err(format!(
                "--{what} {v:?}: only letters, digits and '-' are allowed"
            ))
        } else {
            Ok(())
        }
    };
    let mut path = match (role, service) {
        ("agent", Some(service)) => {
            plain("service", service)?;
            format!("/v1/tokens?role=agent&service={service}")
        }
        ("agent", None) => return Err("--role agent needs --service NAME".into()),
        ("sidecar", None) => "/v1/tokens?role=sidecar".to_string(),
        ("sidecar", Some(_)) => return Err("--service is for agent tokens only".into()),
        (other, _) => return Err(format!("--role {other:?}: must be agent or sidecar")),
    };
    if let Some(ttl) = ttl {
        let ttl: String = ttl.chars().filter(|c| !c.is_whitespace()).collect();
        plain("ttl", &ttl)?;
        humantime::parse_duration(&ttl).map_err(|e| format!("--ttl {ttl:?}: {e}"))?;
        path.push_str("&ttl=");
        path.push_str(&ttl);
    }
    Ok((Method::POST, path))
}

/// `token list`'s table from the directory's JSON answer; `None` if it is not that JSON.
pub fn token_table(body: &str, now_ms: u64) -> Option<String> {
    let doc: serde_json::Value = serde_json::from_str(body).ok()?;
    let mut out = format!(
        "{:<16}  {:<7}  {:<20}  {:<8}  {:>5}  {}\n",
        "ID", "ROLE", "SERVICE", "STATE", "USES", "EXPIRES"
    );
    for t in doc["tokens"].as_array()? {
        let expires = t["expires_ms"].as_u64().unwrap_or(0);
        let state = if t["revoked"] == true {
            "revoked"
        } else if t["expired"] == true {
            "expired"
        } else {
            "valid"
        };
        let when = if expires > now_ms {
            format!(
                "in {}",
                humantime::format_duration(Duration::from_secs((expires - now_ms) / 1000))
            )
        } else {
            "-".into()
        };
        out.push_str(&format!(
            "{:<16}  {:<7}  {:<20}  {:<8}  {:>5}  {}\n",
            t["id"].as_str().unwrap_or("?"),
            t["role"].as_str().unwrap_or("?"),
            t["service"].as_str().unwrap_or("-"),
            state,
            t["uses"].as_u64().unwrap_or(0),
            when
        ));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_requests() {
        assert_eq!(
            token_create_request("agent", Some("web"), Some("1h")).unwrap(),
            (
                Method::POST,
                "/v1/tokens?role=agent&service=web&ttl=1h".into()
            )
        );
        assert_eq!(
            token_create_request("sidecar", None, None).unwrap().1,
            "/v1/tokens?role=sidecar"
        );
        for (role, service, ttl) in [
            ("agent", None, None),
            ("sidecar", Some("web"), None),
            ("admin", None, None),
            ("agent", Some("a&b"), None),
            ("sidecar", None, Some("soon")),
            ("sidecar", None, Some("1h&x=1")),
        ] {
            assert!(
                token_create_request(role, service, ttl).is_err(),
                "{role} {service:?} {ttl:?}"
            );
        }
        let table = token_table(
            r#"{"tokens":[{"id":"ab","role":"agent","service":"web","expires_ms":5000,"revoked":true,"expired":false,"uses":2}]}"#,
            1000,
        )
        .unwrap();
        assert!(
            table.contains("revoked") && table.contains("web"),
            "{table}"
        );
        assert!(token_table("nope", 0).is_none());
    }
}
