//! Limits on what one client can make the server do, with clear answers: a request deadline
//! (`408`), and a poll rate per export job (`429` with `Retry-After` when a client polls
//! sooner than the last status answer asked it to). Body size (`413`) is checked where bodies
//! are read; header size, header read time, stalled responses and connection counts belong to
//! the accept loop ([`crate::transport`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, ApiResult};

/// Answers `408` when a request (headers received to response headers sent, which includes
/// receiving its body) takes longer than the limit: a client that trickles its body in holds
/// a connection and a task for no more than this.
pub async fn request_deadline(
    State(limit): State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(%method, path = %crate::auth::short(&path), limit_ms = limit.as_millis() as u64,
                "request deadline passed");
            ApiError::RequestTimeout(format!(
                "the request was not received and answered within {} s",
                limit.as_secs_f64()
            ))
            .into_response()
        }
    }
}

/// When each job may be polled next. Off unless configured: the conformance suites and
/// Hearth's own tests poll faster than `Retry-After` on purpose.
pub struct PollThrottle {
    enabled: bool,
    next_poll: Mutex<HashMap<String, Instant>>,
}

/// Jobs remembered at most; older entries are dropped first when it is reached.
const MAX_TRACKED_JOBS: usize = 10_000;

impl PollThrottle {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            next_poll: Mutex::new(HashMap::new()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// `429` if job `id` is polled before the time its last answer gave.
    pub fn check(&self, id: &str) -> ApiResult<()> {
        if !self.enabled {
            return Ok(());
        }
        let Ok(map) = self.next_poll.lock() else {
            return Ok(());
        };
        let Some(allowed) = map.get(id) else {
            return Ok(());
        };
        let now = Instant::now();
        if now >= *allowed {
            return Ok(());
        }
        let wait = (*allowed - now).as_secs_f64().ceil().max(1.0) as u64;
        tracing::info!(target: "audit", event = "export.poll_throttled", job = id, outcome = "429",
            "polled sooner than Retry-After");
        Err(ApiError::TooManyRequests {
            message: format!(
                "export job {id} was polled sooner than its last Retry-After asked; poll again in {wait} s"
            ),
            retry_after: wait,
        })
    }

    /// Remembers that job `id` was answered with `Retry-After: retry_after`. A poll is on time
    /// from 90 % of that wait: a client that sleeps what it was told is never refused.
    pub fn told(&self, id: &str, retry_after: u64) {
        if !self.enabled {
            return;
        }
        if let Ok(mut map) = self.next_poll.lock() {
            let now = Instant::now();
            if map.len() >= MAX_TRACKED_JOBS {
                map.retain(|_, allowed| *allowed > now);
                if map.len() >= MAX_TRACKED_JOBS {
                    map.clear();
                }
            }
            let wait = Duration::from_millis(retry_after.saturating_mul(900));
            map.insert(id.to_owned(), now + wait);
        }
    }

    /// The job is done, gone or failed: nothing more to pace.
    pub fn forget(&self, id: &str) {
        if self.enabled
            && let Ok(mut map) = self.next_poll.lock()
        {
            map.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_before_the_told_time_are_refused() {
        let throttle = PollThrottle::new(true);
        assert!(throttle.check("j").is_ok());
        throttle.told("j", 5);
        match throttle.check("j") {
            Err(ApiError::TooManyRequests { retry_after, .. }) => {
                assert!((1..=5).contains(&retry_after))
            }
            other => panic!("expected 429, got {other:?}"),
        }
        assert!(throttle.check("other").is_ok());
        throttle.forget("j");
        assert!(throttle.check("j").is_ok());
        throttle.told("k", 0);
        assert!(throttle.check("k").is_ok());
    }

    #[test]
    fn a_disabled_throttle_allows_everything() {
        let throttle = PollThrottle::new(false);
        throttle.told("j", 100);
        assert!(throttle.check("j").is_ok());
    }
}
