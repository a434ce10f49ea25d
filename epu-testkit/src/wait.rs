//! Waits with a deadline that fail naming what they waited for.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls the async `check` every 20 ms until it is true; panics after `timeout`
/// with "timed out after … waiting for: `what`" (a test assertion).
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_once_true() {
        let mut n = 0;
        eventually(Duration::from_secs(5), "three polls", || {
            n += 1;
            let done = n >= 3;
            async move { done }
        })
        .await;
        assert_eq!(n, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for: never")]
    async fn fails_naming_what_it_waited_for() {
        eventually(Duration::from_millis(50), "never", || async { false }).await;
    }
}
