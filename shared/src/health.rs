//! How an agent checks its instance over localhost (`--health`, and a `[[services]]` entry's
//! `health` on the directory, which passes it to the agents it starts): one parser, so both
//! accept exactly the same checks. The checks themselves run in the agent
//! (`usher_agent::health`).

use std::fmt;

use http::uri::PathAndQuery;

/// How the agent checks its instance over localhost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthSpec {
    /// `GET PATH` on the instance's address; a 2xx status within the timeout passes.
    Http { path: PathAndQuery },
    /// gRPC's health service (`grpc.health.v1.Health/Check`) for `service` ("" for the
    /// server as a whole) answers `SERVING` within the timeout.
    Grpc { service: String },
    /// A TCP connect within the timeout passes.
    Tcp,
    /// Always passes.
    None,
}

impl HealthSpec {
    /// Parses `http:PATH`, `grpc`, `grpc:SERVICE`, `tcp` or `none`; the error is a sentence
    /// without the flag name.
    pub fn parse(spec: &str) -> Result<Self, String> {
        match spec {
            "tcp" => Ok(HealthSpec::Tcp),
            "none" => Ok(HealthSpec::None),
            "grpc" => Ok(HealthSpec::Grpc {
                service: String::new(),
            }),
            _ => {
                if let Some(service) = spec.strip_prefix("grpc:") {
                    if service.is_empty()
                        || service.len() > 1024
                        || service.chars().any(char::is_control)
                    {
                        return Err(format!(
                            "the gRPC service {service:?} must be a name (as in grpc.health.v1 Check requests), 1 to 1024 characters"
                        ));
                    }
                    return Ok(HealthSpec::Grpc {
                        service: service.to_string(),
                    });
                }
                let Some(path) = spec.strip_prefix("http:") else {
                    return Err("expected http:PATH, grpc, grpc:SERVICE, tcp or none".into());
                };
                if !path.starts_with('/') {
                    return Err(format!("the path {path:?} must start with '/'"));
                }
                let path = PathAndQuery::try_from(path)
                    .map_err(|e| format!("the path {path:?} is not a valid URI path: {e}"))?;
                Ok(HealthSpec::Http { path })
            }
        }
    }
}

impl fmt::Display for HealthSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthSpec::Http { path } => write!(f, "http:{path}"),
            HealthSpec::Grpc { service } if service.is_empty() => f.write_str("grpc"),
            HealthSpec::Grpc { service } => write!(f, "grpc:{service}"),
            HealthSpec::Tcp => f.write_str("tcp"),
            HealthSpec::None => f.write_str("none"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_specs() {
        assert_eq!(HealthSpec::parse("none"), Ok(HealthSpec::None));
        assert_eq!(HealthSpec::parse("tcp"), Ok(HealthSpec::Tcp));
        assert_eq!(
            HealthSpec::parse("http:/health?deep=1")
                .unwrap()
                .to_string(),
            "http:/health?deep=1"
        );
        for spec in ["grpc", "grpc:usher.test.Echo"] {
            assert_eq!(HealthSpec::parse(spec).unwrap().to_string(), spec);
        }
        assert_eq!(
            HealthSpec::parse("grpc:echo"),
            Ok(HealthSpec::Grpc {
                service: "echo".into()
            })
        );
        for bad in [
            "http",
            "http:",
            "http:health",
            "udp",
            "http:/a b",
            "grpc:",
            "grpc:a\nb",
        ] {
            assert!(HealthSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
