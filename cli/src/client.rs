//! The CLI's client of the local control API: HTTP/1 over the daemon's unix socket, with hyper.
//!
//! One connection per request: the CLI makes one or two requests per run, and a fresh
//! connection keeps failures simple to attribute (cannot connect = the daemon is not running).
//!
//! Invariants:
//! - every failure is a [`ClientError`] whose [`exit_code`](crate::exit_code::for_error) is stable;
//! - an error answer of the daemon is always decoded into its stable code and message; a body
//!   that is not the documented error shape is reported as a protocol error, not guessed at.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use api::http::ErrorBody;

/// How long the CLI waits for the daemon to answer one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a CLI command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket.
    #[error("the ballast daemon is not running at {}", .socket.display())]
    NotRunning {
        /// The socket tried.
        socket: PathBuf,
        /// The connect error.
        #[source]
        source: std::io::Error,
    },
    /// The socket exists but we may not connect to it.
    #[error("permission denied connecting to the ballast daemon at {}", .socket.display())]
    PermissionDenied {
        /// The socket tried.
        socket: PathBuf,
    },
    /// The daemon did not answer in time.
    #[error("the ballast daemon at {} did not answer within {}s", .socket.display(), REQUEST_TIMEOUT.as_secs())]
    Timeout {
        /// The socket tried.
        socket: PathBuf,
    },
    /// The daemon answered with an error.
    #[error("{message}")]
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// The stable error code (`not_found`, `conflict`, …).
        code: String,
        /// The daemon's message.
        message: String,
    },
    /// The CLI refused an argument before asking the daemon.
    #[error("{0}")]
    InvalidArgument(String),
    /// The connection failed mid-request or the answer was not what the API documents.
    #[error("unexpected answer from the ballast daemon at {}: {message}", .socket.display())]
    Protocol {
        /// The socket used.
        socket: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// A client of one daemon's local API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET path`, decoding a JSON answer.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (_, body) = self.send(Method::GET, path, None).await?;
        self.decode(&body)
    }

    /// `POST path` with a JSON body; returns the status (to tell 200 from 201) and the answer.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<(StatusCode, T), ClientError> {
        let json = serde_json::to_vec(body)
            .map_err(|e| self.protocol(format!("cannot encode the request: {e}")))?;
        let (status, body) = self.send(Method::POST, path, Some(json)).await?;
        Ok((status, self.decode(&body)?))
    }

    /// `DELETE path`, expecting no answer body.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.send(Method::DELETE, path, None).await.map(drop)
    }

    /// Send one request; error statuses become [`ClientError::Api`].
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let exchange = self.exchange(method, path, body);
        let (status, bytes) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                socket: self.socket.clone(),
            })??;
        if status.is_success() {
            return Ok((status, bytes));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(err) => Err(ClientError::Api {
                status,
                code: err.code,
                message: err.message,
            }),
            Err(_) => Err(self.protocol(format!(
                "status {status} with body {:?}",
                String::from_utf8_lossy(&bytes).trim()
            ))),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|source| {
            if source.kind() == std::io::ErrorKind::PermissionDenied {
                ClientError::PermissionDenied {
                    socket: self.socket.clone(),
                }
            } else {
                ClientError::NotRunning {
                    socket: self.socket.clone(),
                    source,
                }
            }
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.protocol(e.to_string()))?;
        // The connection task ends when the exchange below is done and `sender` drops.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "API connection closed with an error");
            }
        });
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "ballast")
            .header(hyper::header::ACCEPT, "application/json");
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| self.protocol(format!("cannot build the request: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| self.protocol(e.to_string()))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.protocol(format!("cannot read the answer: {e}")))?
            .to_bytes();
        Ok((status, bytes))
    }

    fn decode<T: DeserializeOwned>(&self, body: &[u8]) -> Result<T, ClientError> {
        serde_json::from_slice(body)
            .map_err(|e| self.protocol(format!("cannot decode the answer: {e}")))
    }

    fn protocol(&self, message: String) -> ClientError {
        ClientError::Protocol {
            socket: self.socket.clone(),
            message,
        }
    }
}
