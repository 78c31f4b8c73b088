//! The JSON-RPC socket: accepts clients on a Unix socket and answers their requests in
//! order, one connection per task. Framing and request checks are in [`crate::jsonrpc`].

use std::path::Path;
use std::sync::Arc;

use bdev_core::rpc::{RpcError, INVALID_REQUEST};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::jsonrpc::{self, Frame, StreamParser};
use crate::target::Target;

/// Binds the RPC socket. A stale socket file (nobody listening) is replaced; a live one is
/// an error (another target runs there).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another target is listening on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    UnixListener::bind(path)
}

/// Accepts clients until the task is aborted.
pub async fn run(target: Arc<Target>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let t = target.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(t, stream).await {
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

async fn connection(target: Arc<Target>, mut stream: UnixStream) -> std::io::Result<()> {
    let mut parser = StreamParser::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        parser.push(&buf[..n]);
        loop {
            match parser.next_frame() {
                Frame::Value(v) => {
                    if let Some(resp) = handle_value(&target, v).await {
                        stream.write_all(&jsonrpc::encode(&resp)).await?;
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
