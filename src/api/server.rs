//! The API's HTTP server: hyper (HTTP/1.1) on a tokio runtime of one
//! thread, on a UNIX socket. That thread reads what clients write, so it
//! runs under its own seccomp filter ([`ThreadFilter::api`]) and does
//! nothing but HTTP and JSON: each parsed call goes to an executor thread,
//! which does it (an egress change runs nft, a capture opens a file) and
//! answers. A client cannot stall the VM or the other clients: requests
//! and their heads are bounded, a head must come within
//! [`HEAD_TIMEOUT`], a connection lives at most [`CONNECTION_LIFETIME`],
//! and at most [`MAX_CONNECTIONS`] are served at once (more are closed at
//! once).

use std::convert::Infallible;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::Value;

use super::routes::{self, ApiError, Call};
use super::target::ApiTarget;
use crate::vmm::seccomp::{self, ThreadFilter};

/// The largest request body (a PATCH with a long rule list fits).
pub const MAX_BODY: usize = 64 << 10;
/// The largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 << 10;
/// A client must have sent a request's head this long after it began.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed after this long, whatever it is doing.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("--api-sock {0}: something answers there already (another rvm?); stop it, or give another path")]
    Live(PathBuf),
    #[error(
        "--api-sock {0}: the path exists and is not a socket; remove it, or give another path"
    )]
    NotASocket(PathBuf),
    #[error("--api-sock {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A parsed call on its way to the executor, and where the answer goes.
type Job = (Call, tokio::sync::oneshot::Sender<(u16, Value)>);

/// The API's socket, bound (mode 0600) but not served yet: bind it
/// before the VM is made, so that a path in use fails first. Dropping it
/// removes the socket file.
pub struct ApiSocket {
    path: PathBuf,
    listener: Option<std::os::unix::net::UnixListener>,
}

impl ApiSocket {
    /// A new socket at `path`. A stale socket file there (nothing
    /// answers) is replaced; a live one, or a file that is not a socket,
    /// is refused.
    pub fn bind(path: &Path) -> Result<ApiSocket, ApiServerError> {
        let io = |source| ApiServerError::Io {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_socket() => {
                return Err(ApiServerError::NotASocket(path.into()))
            }
            Ok(_) => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(ApiServerError::Live(path.into()));
                }
                std::fs::remove_file(path).map_err(io)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let listener = std::os::unix::net::UnixListener::bind(path).map_err(io)?;
        let socket = ApiSocket {
            path: path.to_path_buf(),
            listener: Some(listener),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        Ok(socket)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The API, serving while this lives; dropping it stops the server and
/// removes the socket.
pub struct ApiServer {
    socket: ApiSocket,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    http: Option<JoinHandle<()>>,
    executor: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Serves `target` on `socket`; `filter` confines the HTTP thread.
    pub fn start(
        mut socket: ApiSocket,
        target: Arc<dyn ApiTarget>,
        filter: Option<ThreadFilter>,
    ) -> Result<ApiServer, ApiServerError> {
        let path = socket.path.clone();
        let io = |source| ApiServerError::Io {
            path: path.clone(),
            source,
        };
        let listener = socket
            .listener
            .take()
            .ok_or_else(|| io(std::io::Error::other("the socket is served already")))?;
        listener.set_nonblocking(true).map_err(io)?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let executor = std::thread::Builder::new()
            .name("rvm-api-exec".into())
            .spawn(move || {
                for (call, answer) in queue {
                    let _ = answer.send(routes::execute(target.as_ref(), call));
                }
            })
            .map_err(io)?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(io)?;
        let http = std::thread::Builder::new()
            .name("rvm-api".into())
            .spawn(move || {
                seccomp::confine(filter.as_ref(), "rvm-api");
                runtime.block_on(serve(listener, jobs, stopped));
            })
            .map_err(io)?;
        Ok(ApiServer {
            socket,
            stop: Some(stop),
            http: Some(http),
            executor: Some(executor),
        })
    }

    pub fn path(&self) -> &Path {
        self.socket.path()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(h) = self.http.take() {
            let _ = h.join();
        }
        // The HTTP thread held the only job sender: the executor ends.
        if let Some(h) = self.executor.take() {
            let _ = h.join();
        }
        // (The socket file goes with `socket`.)
    }
}

async fn serve(
    listener: std::os::unix::net::UnixListener,
    jobs: mpsc::Sender<Job>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("control API: cannot serve: {e}");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                // Over the cap: closed at once, the others go on.
                let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
                let jobs = jobs.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| respond(jobs.clone(), req));
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEAD_TIMEOUT)
                        .max_buf_size(MAX_HEAD)
                        .serve_connection(TokioIo::new(stream), service);
                    let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
                    drop(slot);
                });
            }
        }
    }
}

fn json_response(status: u16, body: &Value) -> Response<Full<Bytes>> {
    let mut text = body.to_string();
    text.push('\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(text)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::from_static(b"{}\n"))))
}

async fn respond(
    jobs: mpsc::Sender<Job>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            let e = ApiError::new(413, format!("the body is larger than {MAX_BODY} bytes"));
            return Ok(json_response(e.status, &e.body()));
        }
        Err(e) => {
            let e = ApiError::new(400, format!("reading the body: {e}"));
            return Ok(json_response(e.status, &e.body()));
        }
    };
    // How many NICs there are decides which ids exist: ask the executor
    // (a cheap call) only for NIC paths.
    let nics = if path.starts_with("/v1/nics/") {
        match call(&jobs, Call::CountNics).await {
            (200, v) => v.as_u64().unwrap_or(0) as usize,
            _ => 0,
        }
    } else {
        0
    };
    let (status, body) = match routes::parse(&method, &path, &body, nics) {
        Ok(c) => call(&jobs, c).await,
        Err(e) => (e.status, e.body()),
    };
    Ok(json_response(status, &body))
}

async fn call(jobs: &mpsc::Sender<Job>, c: Call) -> (u16, Value) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if jobs.send((c, tx)).is_err() {
        let e = ApiError::new(503, "the VM is ending");
        return (e.status, e.body());
    }
    rx.await.unwrap_or_else(|_| {
        let e = ApiError::new(503, "the VM is ending");
        (e.status, e.body())
    })
}
