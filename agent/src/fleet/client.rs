//! A small client of ClickHouse's HTTP interface, on the hyper client the
//! OTLP export uses: a query is a POST whose body is the SQL; an insert is
//! a POST of `JSONEachRow` lines with the `INSERT` in the URL.
//!
//! Credentials go in HTTP basic authentication (18.16 accepts it, as it
//! does the `X-ClickHouse-User`/`-Key` headers; later releases still
//! document both); never in the URL, where a proxy or a server's log
//! could keep them. The password is only ever put in that header, marked
//! sensitive.
//!
//! Idempotency: ClickHouse deduplicates inserts only on replicated tables,
//! or (in later releases) with an `insert_deduplication_token`, which 18.16
//! and the plain `MergeTree` here do not have. So each row carries its
//! batch's id and its index in it, and a retry ([`Client::insert_once`])
//! first asks which rows of that batch are stored and inserts only the
//! others. An insert runs under the query id of its batch, which the
//! server keeps unique among the running queries of a user (every attempt
//! at a batch comes from the same agent, as the same user): a retry sent
//! while the first attempt still runs (it timed out here, not there) is
//! refused with code 216 (retryable) instead of being stored twice.

use std::{collections::BTreeSet, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE},
    Method, Request, Uri,
};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client as HyperClient},
    rt::TokioExecutor,
};

use super::{
    config::Connection,
    error::{chain, exception_code, ClientError},
    rows::EncodedBatch,
    schema::Table,
    sql::url_encode,
};

/// The most of an answer that is read. Queries here return a few rows;
/// the fleet queries' answers are aggregates.
/// The most of an error answer kept in the error (and so in the log).
pub const MAX_ERROR_BYTES: usize = 4096;

pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// A ClickHouse server and the credentials to use there. Cheap to clone
/// (the connection pool is shared).
#[derive(Clone)]
pub struct Client {
    http: HyperClient<HttpConnector, Full<Bytes>>,
    /// The base URL, `http://HOST:PORT/`.
    url: Uri,
    database: String,
    user: String,
    /// `Basic ...`, marked sensitive.
    auth: HeaderValue,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.url)
            .field("database", &self.database)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// What [`Client::insert_once`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InsertOutcome {
    /// Rows inserted now.
    pub inserted: u32,
    /// Rows an earlier attempt had stored: skipped.
    pub already_stored: u32,
}

impl Client {
    /// A client of `conn` (nothing is sent until the first request).
    ///
    /// # Errors
    /// Credentials that cannot go in a header (the config refuses them
    /// earlier).
    pub fn new(conn: Connection) -> Result<Self, ClientError> {
        let url = conn.url.to_string();
        let password = conn.password.as_ref().map_or("", |p| p.expose());
        let token = base64(format!("{}:{password}", conn.user).as_bytes());
        let mut auth =
            HeaderValue::from_str(&format!("Basic {token}")).map_err(|_| ClientError::Request {
                url,
                reason: "the user name cannot go in a header".to_string(),
            })?;
        auth.set_sensitive(true);
        Ok(Self {
            http: HyperClient::builder(TokioExecutor::new()).build_http(),
            url: conn.url,
            database: conn.database,
            user: conn.user,
            auth,
            timeout: conn.timeout,
        })
    }

    /// The server's URL.
    #[must_use]
    pub fn url(&self) -> &Uri {
        &self.url
    }

    /// The fleet's database (a checked identifier).
    #[must_use]
    pub fn database(&self) -> &str {
        &self.database
    }

    /// Runs `sql` and returns the answer's text (in the format the SQL
    /// asks for: `FORMAT TabSeparated` by default).
    ///
    /// # Errors
    /// No answer, an error answer (with ClickHouse's message), or an
    /// answer too long or not text.
    pub async fn query(&self, sql: &str) -> Result<String, ClientError> {
        let body = self
            .post("", Bytes::copy_from_slice(sql.as_bytes()), "text/plain")
            .await?;
        String::from_utf8(body.to_vec()).map_err(|_| ClientError::NotText {
            url: self.url.to_string(),
        })
    }

    /// The server's `version()`, like `18.16.1`.
    ///
    /// # Errors
    /// As [`Self::query`].
    pub async fn version(&self) -> Result<String, ClientError> {
        Ok(self.query("SELECT version()").await?.trim().to_string())
    }

    /// Inserts `rows` (`JSONEachRow` lines) into `table` of the fleet's
    /// database, under a query id made from `batch_id` (see the module's
    /// comment). A first attempt: a retry goes through
    /// [`Self::insert_once`].
    ///
    /// # Errors
    /// As [`Self::query`]; [`ClientError::is_retryable`] says whether to
    /// try again.
    pub async fn insert(
        &self,
        table: Table,
        rows: Bytes,
        batch_id: &str,
    ) -> Result<(), ClientError> {
        let query = format!(
            "INSERT INTO {}.{} FORMAT JSONEachRow",
            self.database,
            table.name()
        );
        // A field the table lacks is skipped, not refused: an agent newer
        // than the table (`fleet init` not run since an upgrade added a
        // column, e.g. `flows.dst_name`) still stores its rows, without
        // that field, instead of having its batches dropped as bad data.
        let params = format!(
            "query={}&query_id={}&input_format_skip_unknown_fields=1",
            url_encode(&query),
            url_encode(&query_id(table, batch_id))
        );
        self.post(&params, rows, "application/x-ndjson")
            .await
            .map(drop)
    }

    /// Inserts the whole of `batch` (its first attempt).
    ///
    /// # Errors
    /// As [`Self::insert`].
    pub async fn insert_batch(&self, batch: &EncodedBatch) -> Result<(), ClientError> {
        self.insert(batch.table(), batch.body().clone(), batch.id())
            .await
    }

    /// Retries `batch`: ends an earlier attempt still running on the
    /// server, then inserts only the batch's rows that are not stored yet
    /// (none if an earlier attempt stored them all), so a batch sent any
    /// number of times is stored once.
    ///
    /// # Errors
    /// As [`Self::insert`].
    pub async fn insert_once(&self, batch: &EncodedBatch) -> Result<InsertOutcome, ClientError> {
        // An earlier attempt may still run on the server (it timed out
        // here, not there): ended first, so that it cannot store its rows
        // after the look below and again with this attempt.
        let kill = format!(
            "KILL QUERY WHERE query_id = {} SYNC",
            super::sql::literal(&query_id(batch.table(), batch.id()))
        );
        self.query(&kill).await?;
        let stored = self.stored_rows(batch).await?;
        let missing = batch.rows()
            - u32::try_from(stored.len())
                .unwrap_or(u32::MAX)
                .min(batch.rows());
        if missing > 0 {
            let body = if stored.is_empty() {
                batch.body().clone()
            } else {
                batch.only(|i| !stored.contains(&i))
            };
            self.insert(batch.table(), body, batch.id()).await?;
        }
        Ok(InsertOutcome {
            inserted: missing,
            already_stored: batch.rows() - missing,
        })
    }

    /// The indices of `batch`'s rows that the table holds.
    ///
    /// # Errors
    /// As [`Self::query`], or an answer that is not a list of indices.
    pub async fn stored_rows(&self, batch: &EncodedBatch) -> Result<BTreeSet<u32>, ClientError> {
        let text = self.query(&batch.stored_rows_sql(&self.database)).await?;
        let mut stored = BTreeSet::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let index = line
                .trim()
                .parse::<u32>()
                .map_err(|_| ClientError::Request {
                    url: self.url.to_string(),
                    reason: format!("unexpected answer to the stored-rows query: {line:?}"),
                })?;
            // An index past the batch is not one of its rows.
            if index < batch.rows() {
                stored.insert(index);
            }
        }
        Ok(stored)
    }

    /// POSTs `body` to the server with the URL query `params`; the whole
    /// exchange, the answer's body included, is under the timeout.
    async fn post(
        &self,
        params: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<Bytes, ClientError> {
        let url = self.url.to_string();
        let authority = self.url.authority().map_or("", |a| a.as_str());
        let target = format!("http://{authority}/?{params}");
        let request = Request::builder()
            .method(Method::POST)
            .uri(&target)
            .header(AUTHORIZATION, self.auth.clone())
            .header(CONTENT_TYPE, content_type)
            .body(Full::new(body))
            .map_err(|e| ClientError::Request {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let exchange = async {
            let response =
                self.http
                    .request(request)
                    .await
                    .map_err(|e| ClientError::Unreachable {
                        url: url.clone(),
                        reason: chain(&e),
                    })?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        ClientError::TooLong {
                            url: url.clone(),
                            limit: MAX_RESPONSE_BYTES,
                        }
                    } else {
                        ClientError::Unreachable {
                            url: url.clone(),
                            reason: chain(&*e),
                        }
                    }
                })?
                .to_bytes();
            if status.is_success() {
                return Ok(body);
            }
            // What reaches a log line: at most 4 KiB, control characters
            // shown escaped (a hostile or broken server must not fill or
            // forge the agent's log).
            let text = String::from_utf8_lossy(&body[..body.len().min(MAX_ERROR_BYTES)]);
            let message = crate::visible::visible(text.trim()).into_owned();
            Err(ClientError::Server {
                url: url.clone(),
                status: status.as_u16(),
                code: exception_code(&message),
                message,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                url: url.clone(),
                timeout: self.timeout,
            })?
    }
}

/// The query id of a batch's insert: the same for every attempt.
fn query_id(table: Table, batch_id: &str) -> String {
    format!("bulkhead-insert-{}-{batch_id}", table.name())
}

/// Standard base64 with padding (RFC 4648), for basic authentication.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::config::Password;

    #[test]
    fn base64_matches_rfc_4648() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain:?}");
        }
    }

    #[test]
    fn the_password_is_never_shown() {
        let client = Client::new(Connection {
            url: "http://127.0.0.1:8123".parse().expect("url"),
            database: "bulkhead".to_string(),
            user: "bulkhead".to_string(),
            password: Some(Password::new("s3cret".to_string())),
            timeout: Duration::from_secs(1),
        })
        .expect("client");
        let shown = format!("{client:?} {:?}", client.auth);
        assert!(
            !shown.contains("s3cret") && !shown.contains(&base64(b"bulkhead:s3cret")),
            "{shown}"
        );
        assert!(client.auth.is_sensitive());
        assert_eq!(query_id(Table::Flows, "h1-7"), "bulkhead-insert-flows-h1-7");
    }

    /// Nothing listens on the port: the error names the URL and says why.
    #[tokio::test]
    async fn an_unreachable_server_is_named() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let client = Client::new(Connection {
            url: format!("http://127.0.0.1:{port}").parse().expect("url"),
            database: "bulkhead".to_string(),
            user: "default".to_string(),
            password: None,
            timeout: Duration::from_secs(5),
        })
        .expect("client");
        let err = client.query("SELECT 1").await.expect_err("nothing listens");
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "cannot reach ClickHouse at http://127.0.0.1:{port}/: "
            )),
            "{text}"
        );
        assert!(text.contains("refused"), "{text}");
        assert!(err.is_retryable());
    }
}
