//! The JSON-RPC socket: accepts clients on a Unix socket and answers their requests in
//! order, one connection per task. Framing and request checks are in [`crate::jsonrpc`].

use std::path::Path;
use std::sync::Arc;

use bdev_core::rpc::{RpcError, INVALID_REQUEST};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::jsonrpc::{self, Frame, StreamParser};
use crate::limits::{Held, Limits, MemBudget, RPC_CONN_FREE};
use crate::sockpath;
use crate::target::Target;

/// Binds the RPC socket (see `sockpath.rs`): only a stale socket is replaced; a live
/// one, anything that is not a socket, or a path too long for a socket address is an error.
pub fn bind(
    path: &Path,
) -> Result<(UnixListener, Option<sockpath::BoundPath>), sockpath::SockPathError> {
    sockpath::bind(path)
}

/// Bytes read from a connection at once.
const READ_CHUNK: usize = 64 * 1024;

/// Methods whose handler may be dropped half-way: they only wait or read. When the client of
/// such a request hangs up, the request is cancelled (its fd and task go at once); any other
/// request runs to the end (its answer is then discarded), so that no operation is left
/// half-done.
const CANCEL_SAFE: &[&str] = &[
    "bdev_get_bdevs",
    "bdev_wait_for_examine",
    "framework_wait_init",
    "rpc_get_methods",
    "spdk_get_version",
    "framework_get_config",
    "framework_get_subsystems",
    "bdev_lvol_get_lvstores",
    "bdev_lvol_get_lvols",
    "nbd_get_exports",
];

/// Whether every request in `v` may be cancelled when its client goes away.
fn cancel_safe(v: &Value) -> bool {
    let one = |r: &Value| {
        r.get("method")
            .and_then(Value::as_str)
            .is_some_and(|m| CANCEL_SAFE.contains(&m))
    };
    match v {
        Value::Array(items) => items.iter().all(one),
        r => one(r),
    }
}

/// Whether the peer closed its end completely (`POLLHUP`; a half-close that still waits for
/// its answers is not a hang-up).
fn peer_hung_up(fd: std::os::fd::RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout; poll does not keep the pointer.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// Resolves when the client of `fd` hung up (checked every 100 ms).
async fn hung_up(fd: std::os::fd::RawFd) {
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if peer_hung_up(fd) {
            return;
        }
    }
}

/// Accepts clients until the task is aborted, with the default [`Limits`].
pub async fn run(target: Arc<Target>, listener: UnixListener) {
    run_with(target, listener, Limits::default()).await
}

/// Accepts clients until the task is aborted. Partial requests of all connections share a
/// budget of `limits.rpc_total_mem` bytes beyond [`RPC_CONN_FREE`] each.
pub async fn run_with(target: Arc<Target>, listener: UnixListener, limits: Limits) {
    let budget = MemBudget::new(limits.rpc_total_mem);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let t = target.clone();
                let b = budget.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(t, stream, b, limits.stall_timeout).await {
                        tracing::debug!("rpc connection: {e}");
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("rpc accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(
    target: Arc<Target>,
    mut stream: UnixStream,
    budget: Arc<MemBudget>,
    stall: std::time::Duration,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let mut parser = StreamParser::new();
    // Small while requests are small: an idle connection costs a few KiB.
    let mut buf = vec![0u8; 4096];
    let mut held = Held::none(&budget);
    loop {
        // Charge what the next read may make the buffer grow to; over budget, stop reading
        // until other connections give some back, and give up after the stall timeout.
        let need = parser
            .capacity_after(READ_CHUNK)
            .saturating_sub(RPC_CONN_FREE);
        if need > held.bytes() {
            let extra = need - held.bytes();
            if tokio::time::timeout(stall, held.grow(extra)).await.is_err() {
                tracing::warn!(
                    "rpc connection: partial request over the memory budget for {stall:?}; dropped"
                );
                stream
                    .write_all(&jsonrpc::encode(&jsonrpc::busy_response()))
                    .await?;
                return Ok(());
            }
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        parser.push(&buf[..n]);
        if n == buf.len() && buf.len() < READ_CHUNK {
            buf.resize(READ_CHUNK, 0);
        }
        loop {
            match parser.next_frame() {
                Frame::Value(v) => {
                    let raw_ids = parser.take_raw_ids();
                    // Large listings are written straight as text (no Value tree).
                    if raw_ids.is_empty() {
                        if let Some(bytes) = crate::listing::raw_response(&target, &v) {
                            stream.write_all(&bytes).await?;
                            continue;
                        }
                    }
                    let resp = if cancel_safe(&v) {
                        tokio::select! {
                            r = handle_value(&target, v) => r,
                            _ = hung_up(fd) => return Ok(()),
                        }
                    } else {
                        handle_value(&target, v).await
                    };
                    if let Some(resp) = resp {
                        stream
                            .write_all(&jsonrpc::encode_exact(&resp, &raw_ids))
                            .await?;
                    }
                    target.act_on_kill();
                }
                Frame::NeedMore => break,
                Frame::ParseError => {
                    stream
                        .write_all(&jsonrpc::encode(&jsonrpc::parse_error_response()))
                        .await?;
                    return Ok(());
                }
                Frame::TooLarge => {
                    stream
                        .write_all(&jsonrpc::encode(&jsonrpc::too_large_response()))
                        .await?;
                    return Ok(());
                }
            }
        }
        parser.shrink();
        held.shrink_to(parser.capacity().saturating_sub(RPC_CONN_FREE));
    }
}

/// Answers one received JSON value (a request or a batch); `None` when nothing is sent back
/// (notifications).
pub async fn handle_value(target: &Arc<Target>, v: Value) -> Option<Value> {
    match v {
        Value::Array(items) => {
            if items.is_empty() {
                return Some(jsonrpc::response_err(
                    Value::Null,
                    &RpcError::new(INVALID_REQUEST, "Invalid request"),
                ));
            }
            let mut out = Vec::new();
            for item in items {
                if let Some(r) = handle_single(target, item).await {
                    out.push(r);
                }
            }
            (!out.is_empty()).then_some(Value::Array(out))
        }
        v => handle_single(target, v).await,
    }
}

async fn handle_single(target: &Arc<Target>, v: Value) -> Option<Value> {
    let req = match jsonrpc::parse_request(v) {
        Ok(r) => r,
        Err((id, e)) => return Some(jsonrpc::response_err(id, &e)),
    };
    let result = target.call(&req.method, req.params).await;
    if result.is_ok() {
        target.client_call_succeeded(&req.method).await;
    }
    let id = req.id?;
    Some(match result {
        Ok(v) => jsonrpc::response_ok(id, v),
        Err(e) => jsonrpc::response_err(id, &e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bdev_core::Registry;
    use serde_json::json;

    use crate::nbd::server::NbdServer;

    fn target() -> Arc<Target> {
        let registry = Registry::new();
        let nbd = NbdServer::new(registry.clone());
        Target::new(registry, nbd, Default::default(), false)
    }

    #[tokio::test]
    async fn batches_and_notifications() {
        let t = target();
        assert_eq!(
            handle_value(&t, json!([])).await.unwrap()["error"]["code"],
            json!(INVALID_REQUEST)
        );
        // Notifications get nothing, alone or in a batch.
        assert_eq!(
            handle_value(&t, json!({"method": "spdk_get_version"})).await,
            None
        );
        assert_eq!(
            handle_value(&t, json!([{"method": "spdk_get_version", "id": null}])).await,
            None
        );
        let r = handle_value(
            &t,
            json!([{"method": "spdk_get_version", "id": 1}, 5, {"method": "x", "id": "a"}]),
        )
        .await
        .unwrap();
        let r = r.as_array().unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0]["id"], json!(1));
        assert_eq!(r[1]["error"]["code"], json!(INVALID_REQUEST));
        assert_eq!(r[2]["error"]["code"], json!(-32601));
        assert_eq!(r[2]["id"], json!("a"));
    }
}
