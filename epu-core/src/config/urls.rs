//! [`split_amqp_urls`]: one `amqp_url` string naming several brokers.

/// The URLs in `value`, a broker URL or several separated by commas, in order, each
/// trimmed.
///
/// A comma separates two URLs only where the next one starts (`amqp://` or `amqps://`,
/// after optional spaces), so a comma inside a password or a query stays part of its
/// URL. Empty entries (`a,,b`, a trailing comma) are dropped; a part that is not a URL
/// at all stays an entry of its own, for the connect to refuse with its own message.
pub fn split_amqp_urls(value: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (i, part) in value.split(',').enumerate() {
        let starts_url = starts_with_scheme(part.trim_start());
        match out.last_mut() {
            Some(last) if i > 0 && !starts_url => {
                last.push(',');
                last.push_str(part);
            }
            _ => out.push(part.to_owned()),
        }
    }
    out.into_iter()
        .map(|u| u.trim().trim_end_matches(',').trim_end().to_owned())
        .filter(|u| !u.is_empty())
        .collect()
}

fn starts_with_scheme(s: &str) -> bool {
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("amqp://") || lower.starts_with("amqps://")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_table() {
        let cases: &[(&str, &[&str])] = &[
            ("", &[]),
            ("  ", &[]),
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                &["amqp://guest:guest@127.0.0.1:5672/%2f"],
            ),
            (
                "amqp://u:p@h1:5672/%2f,amqp://u:p@h2:5672/%2f",
                &["amqp://u:p@h1:5672/%2f", "amqp://u:p@h2:5672/%2f"],
            ),
            (
                " amqp://h1 , amqps://h2:5671/v ,AMQP://h3 ",
                &["amqp://h1", "amqps://h2:5671/v", "AMQP://h3"],
            ),
            // A comma in a password (or anywhere but before a scheme) is not a separator.
            ("amqp://u:pa,ss@h1/%2f", &["amqp://u:pa,ss@h1/%2f"]),
            ("amqp://u:pa,,ss@h1/%2f", &["amqp://u:pa,,ss@h1/%2f"]),
            (
                "amqp://u:a,b@h1/%2f,amqp://u:c,d@h2/%2f",
                &["amqp://u:a,b@h1/%2f", "amqp://u:c,d@h2/%2f"],
            ),
            // Empty entries and trailing commas go.
            ("amqp://h1,,amqp://h2,", &["amqp://h1", "amqp://h2"]),
            (",amqp://h1", &["amqp://h1"]),
            // Not a URL: kept, for the connect to name.
            ("rabbit:5672", &["rabbit:5672"]),
            ("rabbit:5672,amqp://h2", &["rabbit:5672", "amqp://h2"]),
        ];
        for (given, want) in cases {
            assert_eq!(split_amqp_urls(given), *want, "{given:?}");
        }
    }
}
