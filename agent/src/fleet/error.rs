//! What the ClickHouse client reports: every error names the server's URL;
//! an error answer carries the HTTP status and ClickHouse's own message
//! (its body), with the exception code read from it.

use std::time::Duration;

/// ClickHouse's exception codes that mean "these credentials are refused":
/// `UNKNOWN_USER`, `WRONG_PASSWORD`, `REQUIRED_PASSWORD`,
/// `IP_ADDRESS_NOT_ALLOWED` (what 18.16 answers, with HTTP 401), and
/// `AUTHENTICATION_FAILED`, which later releases answer instead.
const AUTH_CODES: &[u32] = &[192, 193, 194, 195, 516];

/// Codes of conditions that pass: the server is busy, short of memory or
/// merging (`TOO_MANY_PARTS`), a query timed out, or an insert with the
/// same query id (the same batch, sent before) is still running.
const TRANSIENT_CODES: &[u32] = &[159, 202, 209, 210, 216, 241, 252];

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No HTTP answer: connection refused, reset, DNS.
    #[error("cannot reach ClickHouse at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("ClickHouse at {url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    /// An answer other than 200: `message` is ClickHouse's body.
    #[error("ClickHouse at {url} {}: HTTP {status}: {message}",
            if is_auth(*code) { "refused the credentials" } else { "answered with an error" })]
    Server {
        url: String,
        status: u16,
        /// The exception code, when the body starts with `Code: N`.
        code: Option<u32>,
        message: String,
    },
    /// An answer longer than the client reads (see `MAX_RESPONSE_BYTES`).
    #[error("ClickHouse at {url} answered more than {limit} bytes")]
    TooLong { url: String, limit: usize },
    #[error("ClickHouse at {url} answered text that is not UTF-8")]
    NotText { url: String },
    /// A request that cannot be built (a bug, or a batch that is not one).
    #[error("cannot send to ClickHouse at {url}: {reason}")]
    Request { url: String, reason: String },
}

impl ClientError {
    /// Whether the server refused the user or password.
    #[must_use]
    pub fn is_auth_refused(&self) -> bool {
        matches!(self, ClientError::Server { code, status, .. }
            if is_auth(*code) || *status == 401 || *status == 403)
    }

    /// Whether the same request may succeed later unchanged: no answer, a
    /// timeout, a gateway's 502/503/504, or a passing condition of the
    /// server's. Everything else (bad credentials, SQL or data the server
    /// refuses) fails again: retrying it would only hold up what follows.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } | ClientError::Timeout { .. } => true,
            ClientError::Server { status, code, .. } => {
                matches!(status, 502..=504) || code.is_some_and(|c| TRANSIENT_CODES.contains(&c))
            }
            _ => false,
        }
    }

    /// ClickHouse's exception code, if the answer carried one.
    #[must_use]
    pub fn code(&self) -> Option<u32> {
        match self {
            ClientError::Server { code, .. } => *code,
            _ => None,
        }
    }
}

fn is_auth(code: Option<u32>) -> bool {
    code.is_some_and(|c| AUTH_CODES.contains(&c))
}

/// The exception code at the start of an error body: `Code: 193, e.displayText() = ...`
/// (18.x) or `Code: 516. DB::Exception: ...` (later releases).
#[must_use]
pub fn exception_code(body: &str) -> Option<u32> {
    let rest = body.trim_start().strip_prefix("Code: ")?;
    let digits: &str = &rest[..rest.find(|c: char| !c.is_ascii_digit())?];
    digits.parse().ok()
}

/// An error and its sources, "outer: inner: innermost" (hyper's own
/// message alone says only "client error (Connect)").
pub(super) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(status: u16, body: &str) -> ClientError {
        ClientError::Server {
            url: "http://127.0.0.1:8123/".to_string(),
            status,
            code: exception_code(body),
            message: body.trim().to_string(),
        }
    }

    #[test]
    fn codes_are_read_from_old_and_new_bodies() {
        assert_eq!(
            exception_code(
                "Code: 193, e.displayText() = DB::Exception: Wrong password for user bulkhead"
            ),
            Some(193)
        );
        assert_eq!(
            exception_code("Code: 516. DB::Exception: bulkhead: Authentication failed"),
            Some(516)
        );
        assert_eq!(exception_code("Bad Gateway"), None);
    }

    #[test]
    fn refused_credentials_are_told_apart_from_other_errors() {
        let auth = server(
            500,
            "Code: 193, e.displayText() = DB::Exception: Wrong password for user bulkhead",
        );
        assert!(auth.is_auth_refused());
        assert!(!auth.is_retryable());
        assert_eq!(
            auth.to_string(),
            "ClickHouse at http://127.0.0.1:8123/ refused the credentials: HTTP 500: \
             Code: 193, e.displayText() = DB::Exception: Wrong password for user bulkhead"
        );
        let syntax = server(
            500,
            "Code: 62, e.displayText() = DB::Exception: Syntax error",
        );
        assert!(!syntax.is_auth_refused() && !syntax.is_retryable());
        assert!(server(500, "Code: 252. DB::Exception: Too many parts").is_retryable());
        assert!(server(503, "").is_retryable());
    }
}
