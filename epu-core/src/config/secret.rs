//! [`Secret`] and [`redact_url`]: secrets never reach a log or an error.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A secret string (a password, an HMAC key). `Debug` and `Display` print `***`, so it
/// never reaches a log or an error; [`Secret::expose`] gives the value to the code that
/// needs it.
///
/// It deserializes from a plain string. It *serializes* to the plain string too, so that
/// a config can be written out for a child service; never log a serialized config.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value. Do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// `url` with the password of its userinfo (`scheme://user:PASSWORD@host/…`) replaced by
/// `***`. A URL without a password is returned unchanged.
pub fn redact_url(url: &str) -> String {
    let authority_start = match url.find("://") {
        Some(i) => i + 3,
        None => 0,
    };
    let rest = &url[authority_start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let Some(colon) = userinfo.find(':') else {
        return url.to_owned();
    };
    let password_start = authority_start + colon + 1;
    let password_end = authority_start + at;
    format!("{}***{}", &url[..password_start], &url[password_end..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_hides_only_the_password() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("amqps://user:p%40ss:word@broker.example/vhost?heartbeat=10"),
            "amqps://user:***@broker.example/vhost?heartbeat=10"
        );
        assert_eq!(redact_url("amqp://user@host/"), "amqp://user@host/");
        assert_eq!(redact_url("amqp://host:5672/x@y"), "amqp://host:5672/x@y");
        assert_eq!(redact_url("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
        assert_eq!(redact_url("user:secret@host"), "user:***@host");
        assert_eq!(redact_url(""), "");
        assert_eq!(redact_url("amqp://:pw@host"), "amqp://:***@host");
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(s.expose(), "hunter2");
    }
}
