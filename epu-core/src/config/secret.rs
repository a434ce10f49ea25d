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
/// `***`. A URL without a password is returned unchanged. A list of URLs (as
/// `bus.amqp_url` may hold, see [`split_amqp_urls`](super::split_amqp_urls)) comes back
/// as the list of its redacted URLs, joined by commas.
pub fn redact_url(url: &str) -> String {
    let urls = super::split_amqp_urls(url);
    if urls.len() > 1 {
        return urls
            .iter()
            .map(|u| redact_one(u))
            .collect::<Vec<_>>()
            .join(",");
    }
    redact_one(url)
}

fn redact_one(url: &str) -> String {
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
    fn redact_url_hides_every_password_of_a_list() {
        assert_eq!(
            redact_url("amqp://u:one@h1:5672/%2f, amqp://u:two@h2:5672/%2f,amqps://h3"),
            "amqp://u:***@h1:5672/%2f,amqp://u:***@h2:5672/%2f,amqps://h3"
        );
        assert_eq!(
            redact_url("amqp://u:pa,ss@h1/%2f,amqp://v:x,y@h2/%2f"),
            "amqp://u:***@h1/%2f,amqp://v:***@h2/%2f"
        );
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(s.expose(), "hunter2");
    }
}
