//! Serving one accepted connection once its TLS handshake is done: how long
//! it may sit with no request in progress (`limits.idle_timeout`), how long
//! a request's body may take to arrive (`limits.body_timeout`), and how it
//! ends when the gateway stops.
//!
//! hyper applies neither timeout by itself without a timer, and its HTTP/1
//! header timeout does not cover HTTP/2. Here both protocols are treated
//! alike: a connection counts the requests its handlers are working on
//! ([`Activity`]), and one with none for the idle timeout is shut down
//! gracefully (an HTTP/1 connection closes, an HTTP/2 one is sent GOAWAY).
//! A client that opens a connection and never finishes a request's headers
//! has no request in progress either, so it is closed the same way.
//!
//! A connection hyper is done with is drained before it is closed
//! ([`Lingering`], [`linger`]), so that an answer sent before a request's
//! body was read (`413`, `408`) reaches a client still writing it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;

/// How long a connection being shut down (the gateway stopping, or idle)
/// has to finish what it is writing before it is dropped.
pub(crate) const GRACE: Duration = Duration::from_secs(10);

/// The requests in progress on one connection, and when the last one ended.
#[derive(Debug)]
pub(crate) struct Activity {
    opened: Instant,
    in_progress: AtomicUsize,
    /// Milliseconds from `opened` to the end of the last request.
    last_ended_ms: AtomicU64,
    /// Told when the connection is to carry nothing more (its certificate
    /// was revoked or has expired): it is shut down like an idle one.
    end: tokio::sync::Notify,
}

impl Activity {
    /// A connection opened now, with no request yet.
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            opened: Instant::now(),
            in_progress: AtomicUsize::new(0),
            last_ended_ms: AtomicU64::new(0),
            end: tokio::sync::Notify::new(),
        })
    }

    /// Ends the connection once the requests in progress are answered:
    /// HTTP/1.1 closes (the refusal says `Connection: close` too), HTTP/2
    /// is sent GOAWAY, which that header cannot do.
    pub(crate) fn end(&self) {
        // A permit is kept if `serve` is not waiting at this moment.
        self.end.notify_one();
    }

    /// A request begins; it is in progress until the guard is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> InProgress {
        self.in_progress.fetch_add(1, Ordering::SeqCst);
        InProgress(self.clone())
    }

    /// Something happened on the connection now: a request ended, or a
    /// large response's writing went on (see [`Guarded`]).
    fn progress(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ended_ms.fetch_max(ms, Ordering::SeqCst);
    }

    /// Since when the connection has had no request in progress (nor a
    /// large response's writing going on); `None` while one is.
    fn idle_since(&self) -> Option<Instant> {
        if self.in_progress.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let ms = self.last_ended_ms.load(Ordering::SeqCst);
        Some(self.opened + Duration::from_millis(ms))
    }
}

/// A request in progress on a connection (see [`Activity::begin`]).
#[derive(Debug)]
pub(crate) struct InProgress(Arc<Activity>);

impl InProgress {
    /// The connection it is on.
    pub(crate) fn activity(&self) -> Arc<Activity> {
        self.0.clone()
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        // The end time first: a check that sees no request in progress
        // then sees this end too.
        self.0.progress();
        self.0.in_progress.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Responses up to this size are handed to the connection whole when
/// their handler returns, and count as written then. A larger one is
/// handed over in pieces of this size ([`Guarded`]), each counted as
/// activity: a slow reader of a large fetch is not taken for an idle
/// connection, and one that stops reading is.
pub(crate) const SMALL_RESPONSE: u64 = 64 * 1024;

/// A response body handed to the connection a piece at a time, each piece
/// taken counted as activity on the connection (see [`SMALL_RESPONSE`]).
#[derive(Debug)]
pub(crate) struct Guarded<B> {
    inner: B,
    pending: Bytes,
    activity: Arc<Activity>,
}

impl<B> Guarded<B> {
    /// `inner`, its writing counted on `activity`.
    pub(crate) fn new(inner: B, activity: Arc<Activity>) -> Guarded<B> {
        Guarded {
            inner,
            pending: Bytes::new(),
            activity,
        }
    }
}

impl<B> Body for Guarded<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(SMALL_RESPONSE as usize);
                let piece = this.pending.split_to(n);
                this.activity.progress();
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => this.pending = data,
                    Err(other) => return Poll::Ready(Some(Ok(other))),
                },
                other => return other,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let pending = self.pending.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(pending));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(pending));
        }
        hint
    }
}

/// How a served connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The client closed it, or it finished after a graceful shutdown.
    Closed,
    /// It had no request in progress for the idle timeout and was shut down.
    Idle,
    /// The gateway stopped.
    Stopped,
    /// Its certificate was revoked or expired while it was open.
    Refused,
}

/// A connection future hyper can shut down gracefully.
pub(crate) trait Graceful: Future {
    /// Starts a graceful shutdown (see hyper's `graceful_shutdown`).
    fn shut_down(self: Pin<&mut Self>);
}

impl<I, S, E, B> Graceful for hyper_util::server::conn::auto::Connection<'static, I, S, E>
where
    S: hyper::service::Service<
        axum::http::Request<hyper::body::Incoming>,
        Response = axum::http::Response<B>,
    >,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// How serving a connection ended.
#[derive(Debug)]
pub(crate) struct Served<E> {
    /// Why.
    pub(crate) ended: Ended,
    /// The error it ended with, if any.
    pub(crate) error: Option<E>,
    /// Dropped unfinished, [`GRACE`] after its shutdown began: what it was
    /// writing is cut short, and its stream is not to be closed as if it
    /// had ended well (see [`linger`]).
    pub(crate) cut_short: bool,
}

/// Serves `conn` until it ends: closes it gracefully once it has had no
/// request in progress for `idle` (per `activity`), or when `stop` turns
/// true; either way drops it if it has not finished [`GRACE`] later (an
/// idle close waits on while a handler is still at work).
pub(crate) async fn serve<C, E>(
    conn: C,
    activity: &Activity,
    idle: Duration,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Served<E>
where
    C: Graceful<Output = Result<(), E>>,
{
    let mut conn = std::pin::pin!(conn);
    let check = tokio::time::sleep(idle);
    let mut check = std::pin::pin!(check);
    // Set once a graceful shutdown has begun, saying why. An idle close
    // waits on for a handler still at work; the others do not.
    let mut closing: Option<Ended> = None;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                return Served {
                    ended: closing.unwrap_or(Ended::Closed),
                    error: r.err(),
                    cut_short: false,
                };
            }
            () = activity.end.notified(), if closing.is_none() => {
                conn.as_mut().shut_down();
                closing = Some(Ended::Refused);
                check.as_mut().reset(Instant::now() + GRACE);
            }
            _ = crate::stopped(stop), if closing != Some(Ended::Stopped) => {
                conn.as_mut().shut_down();
                closing = Some(Ended::Stopped);
                check.as_mut().reset(Instant::now() + GRACE);
            }
            () = check.as_mut() => {
                let now = Instant::now();
                match closing {
                    None => match activity.idle_since() {
                        Some(since) if now >= since + idle => {
                            conn.as_mut().shut_down();
                            closing = Some(Ended::Idle);
                            check.as_mut().reset(now + GRACE);
                        }
                        Some(since) => check.as_mut().reset(since + idle),
                        None => check.as_mut().reset(now + idle),
                    },
                    // A request that came in as the connection was closing
                    // idle is answered first.
                    Some(Ended::Idle) if activity.idle_since().is_none() => {
                        check.as_mut().reset(now + GRACE);
                    }
                    Some(why) => {
                        return Served {
                            ended: why,
                            error: None,
                            cut_short: true,
                        }
                    }
                }
            }
        }
    }
}

/// A request body that must arrive within a time limit, counted from the
/// first moment the gateway waits for it (a body that came in with its
/// headers costs no timer).
#[derive(Debug)]
pub(crate) struct Deadline<B> {
    inner: B,
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> Deadline<B> {
    /// `inner`, which must arrive within `limit`.
    pub(crate) fn new(inner: B, limit: Duration) -> Deadline<B> {
        Deadline {
            inner,
            limit,
            timer: None,
        }
    }
}

/// The error a [`Deadline`] body ends with when its time is up.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {}s", .0.as_secs())]
pub(crate) struct BodyTooSlow(pub(crate) Duration);

impl<B> Body for Deadline<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let limit = this.limit;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTooSlow(limit))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The [`BodyTooSlow`] behind `e`, however deep in its sources.
pub(crate) fn too_slow<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyTooSlow> {
    let mut at = Some(e);
    while let Some(e) = at {
        if let Some(slow) = e.downcast_ref::<BodyTooSlow>() {
            return Some(slow);
        }
        at = e.source();
    }
    None
}

/// How long a connection's stream is drained once hyper is done with it
/// (or a handshake was refused).
pub(crate) const LINGER: Duration = Duration::from_secs(2);
/// How much of what a client still sends is read while its connection is
/// drained after it was served.
const SERVED_LINGER_BYTES: usize = 64 << 20;

/// A connection's stream that, once hyper drops it, is handed back (to
/// [`linger`]) instead of being closed at once.
///
/// A request refused before its body was read (too large, too slow, a
/// revoked certificate) is answered and the connection closed while the
/// client may still be sending the body. Closing a socket with data unread
/// makes the kernel send a reset, and a client that gets it before reading
/// the answer sees "broken pipe" or "connection reset" instead of `413`:
/// a gateway told so retries a message its peer will never take, and a
/// person is told their network failed. Draining the rest first lets the
/// answer be read (by a client that reads while it writes, as hyper's
/// does, or that finishes writing within [`LINGER`]).
pub(crate) struct Lingering<S> {
    stream: Option<S>,
    back: Option<tokio::sync::oneshot::Sender<S>>,
}

impl<S> Lingering<S> {
    /// Wraps `stream`; the receiver gets it back when the wrapper is dropped.
    pub(crate) fn new(stream: S) -> (Lingering<S>, tokio::sync::oneshot::Receiver<S>) {
        let (back, rx) = tokio::sync::oneshot::channel();
        (
            Lingering {
                stream: Some(stream),
                back: Some(back),
            },
            rx,
        )
    }

    fn stream(&mut self) -> std::io::Result<Pin<&mut S>>
    where
        S: Unpin,
    {
        self.stream
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotConnected))
    }
}

impl<S> Drop for Lingering<S> {
    fn drop(&mut self) {
        if let (Some(stream), Some(back)) = (self.stream.take(), self.back.take()) {
            // No one waiting: it is closed here, as before.
            let _ = back.send(stream);
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Lingering<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut().stream() {
            Ok(s) => s.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Lingering<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut().stream() {
            Ok(s) => s.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut().stream() {
            Ok(s) => s.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(S::is_write_vectored)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut().stream() {
            Ok(s) => s.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut().stream() {
            Ok(s) => s.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// Closes a served connection's stream (given back by [`Lingering`]) as
/// [`drain`] does, reading at most [`SERVED_LINGER_BYTES`]; one `served`
/// says was cut short, or ended with an error (mid-response, perhaps), is
/// dropped as it is, as before: a clean close would make what it was
/// writing look whole.
pub(crate) async fn linger<S, E>(back: tokio::sync::oneshot::Receiver<S>, served: &Served<E>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if served.cut_short || served.error.is_some() {
        return;
    }
    if let Ok(stream) = back.await {
        drain(stream, SERVED_LINGER_BYTES).await;
    }
}

/// Closes `stream` so that the client reads what it was last sent: its
/// write side is shut (a no-op if that was done), then what the client
/// still sends is read and discarded until it closes, for at most
/// [`LINGER`] and `max_bytes`.
pub(crate) async fn drain<S>(mut stream: S, max_bytes: usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let drain = async {
        if stream.shutdown().await.is_err() {
            return;
        }
        // Often the client has closed already: nothing is allocated then.
        let mut first = [0u8; 1];
        let mut read = match stream.read(&mut first).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut buf = vec![0u8; 16 * 1024];
        while read < max_bytes {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}
