//! When to ask again: `Retry-After` (seconds or an HTTP-date) when the server gives one,
//! exponential backoff when it does not, and a budget of consecutive failures.

use std::time::{Duration, SystemTime};

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};

/// How patient the client is with a server.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Consecutive transient failures (network errors, `429`, `5xx`) tolerated per request
    /// before giving up. A success resets the count.
    pub max_attempts: u32,
    /// The first backoff delay; each further one doubles, up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// The shortest wait between two status requests, whatever `Retry-After` says: a server
    /// answering `Retry-After: 0` must not turn polling into a busy loop.
    pub min_poll_interval: Duration,
    /// The longest wait honoured from a `Retry-After`, so a clock or a typo on the server side
    /// cannot park the client for a day.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            min_poll_interval: Duration::from_millis(100),
            max_retry_after: Duration::from_secs(15 * 60),
        }
    }
}

/// Doubling delays from the policy's initial backoff.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(policy: &RetryPolicy) -> Self {
        Self {
            next: policy.initial_backoff,
            max: policy.max_backoff,
        }
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

/// The delay a `Retry-After` value asks for: delta-seconds (decimals tolerated, as some
/// servers send them) or an HTTP-date, measured from `now`. A date in the past means "now".
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The `Retry-After` of a response, clamped to the policy.
pub(crate) fn retry_after(headers: &HeaderMap, policy: &RetryPolicy) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, SystemTime::now()).map(|d| d.min(policy.max_retry_after))
}

/// Statuses worth asking again for: the server is busy or briefly broken.
pub(crate) fn is_transient_status(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
}

/// OperationOutcome issue codes that say "try again" (the FHIR `transient` family, less
/// `exception`, which servers also use for a job that failed for good).
pub(crate) fn is_transient_code(code: &str) -> bool {
    matches!(
        code,
        "transient" | "timeout" | "throttled" | "lock-error" | "no-store" | "incomplete"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_and_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after(" 1.5 ", now),
            Some(Duration::from_millis(1500))
        );
        // 784111777 is Sun, 06 Nov 1994 08:49:37 GMT.
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("-3", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("NaN", now), None);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        let mut backoff = Backoff::new(&policy);
        let delays: Vec<_> = (0..5).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, vec![250, 500, 1000, 1000, 1000]);
    }

    #[test]
    fn which_statuses_and_codes_are_transient() {
        assert!(is_transient_status(StatusCode::TOO_MANY_REQUESTS));
        assert!(is_transient_status(StatusCode::BAD_GATEWAY));
        assert!(!is_transient_status(StatusCode::NOT_FOUND));
        assert!(is_transient_code("throttled"));
        assert!(!is_transient_code("exception"));
    }
}
