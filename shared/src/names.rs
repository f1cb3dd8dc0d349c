//! Service and version names.
//!
//! Both are DNS labels (`[a-z0-9-]`, 1–63 characters, not starting or ending with `-`) so
//! that `Host: <version>.<service>` is always unambiguous.

use thiserror::Error;

/// Why a name is not a DNS label.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("is {0} characters long; at most 63 are allowed")]
    TooLong(usize),
    #[error("contains {0:?}; only lowercase letters, digits and '-' are allowed")]
    BadCharacter(char),
    #[error("must not start or end with '-'")]
    EdgeHyphen,
}

/// Checks that `name` is a DNS label: `[a-z0-9-]`, 1–63 characters, no leading or trailing `-`.
pub fn validate_label(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > 63 {
        return Err(NameError::TooLong(name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(NameError::BadCharacter(c));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(NameError::EdgeHyphen);
    }
    Ok(())
}

/// Checks an instance id chosen by an agent: 1–128 visible ASCII characters.
pub fn validate_instance_id(id: &str) -> Result<(), NameError> {
    if id.is_empty() {
        return Err(NameError::Empty);
    }
    if id.len() > 128 {
        return Err(NameError::TooLong(id.len()));
    }
    match id.chars().find(|c| !c.is_ascii_graphic()) {
        Some(c) => Err(NameError::BadCharacter(c)),
        None => Ok(()),
    }
}

/// Checks a `host:port` address (a name or an IP literal, port 1–65535) without resolving it.
/// The error is a sentence without the flag name.
pub fn validate_host_port(addr: &str) -> Result<(), String> {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err("expected host:port".into());
    };
    if host.is_empty() || host == "[]" {
        return Err("the host is empty".into());
    }
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err("the port must be a number from 1 to 65535".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["web", "v2", "a", "my-service-01", &"a".repeat(63)] {
            assert_eq!(validate_label(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_everything_else() {
        assert_eq!(validate_label(""), Err(NameError::Empty));
        assert_eq!(validate_label(&"a".repeat(64)), Err(NameError::TooLong(64)));
        assert_eq!(validate_label("Web"), Err(NameError::BadCharacter('W')));
        assert_eq!(validate_label("v2.web"), Err(NameError::BadCharacter('.')));
        assert_eq!(validate_label("web_1"), Err(NameError::BadCharacter('_')));
        assert_eq!(validate_label("-web"), Err(NameError::EdgeHyphen));
        assert_eq!(validate_label("web-"), Err(NameError::EdgeHyphen));
        assert_eq!(validate_label("wéb"), Err(NameError::BadCharacter('é')));
    }

    #[test]
    fn host_ports() {
        assert!(validate_host_port("directory.internal:7400").is_ok());
        assert!(validate_host_port("[::1]:7400").is_ok());
        for bad in ["nohost", ":7400", "host:0", "host:http", "[]:1"] {
            assert!(validate_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn instance_ids() {
        assert!(validate_instance_id("host-1234-abcd").is_ok());
        assert!(validate_instance_id("").is_err());
        assert!(validate_instance_id("a b").is_err());
        assert!(validate_instance_id(&"x".repeat(129)).is_err());
    }
}
