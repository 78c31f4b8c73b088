//! [`NbdClientBdev`]: the [`BlockDevice`] face of an NBD client.

use std::sync::Arc;

use async_trait::async_trait;
use bdev_core::{BdevError, BlockDevice, IoType};
use iobuf::IoBuf;
use uuid::Uuid;

use crate::client::Client;
use crate::NbdError;
use nbd_proto::{self as proto, Cmd};

/// Product name, as `bdev_get_bdevs` prints it.
pub const PRODUCT_NAME: &str = "NBD client";
/// Module name.
pub const MODULE_NAME: &str = "nbd";

/// Largest range of one trim or write-zeroes request (they carry no payload, but the length
/// field is 32 bits and servers may refuse huge ranges).
const MAX_RANGE_BYTES: u64 = 1 << 30;

/// A block device whose blocks live on an NBD server.
///
/// Handles are cheap: every handle of one client shares its connections and state. Block
/// size and size come from the server (the minimum block size, at least 512 bytes). Reads,
/// writes, flush, unmap (trim) and write-zeroes go to the server as its transmission flags
/// allow; a read-only export, or one opened with `read_only`, refuses writes with EPERM.
pub struct NbdClientBdev {
    client: Arc<Client>,
}

impl std::fmt::Debug for NbdClientBdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClientBdev")
            .field("name", &self.client.cfg.name)
            .field("address", &self.address())
            .field("export", &self.client.cfg.export)
            .finish()
    }
}

impl NbdClientBdev {
    pub(crate) fn from_client(client: Arc<Client>) -> Self {
        NbdClientBdev { client }
    }

    pub(crate) fn client(&self) -> &Arc<Client> {
        &self.client
    }

    /// The server address, as given (`unix:PATH` or `HOST:PORT`).
    pub fn address(&self) -> String {
        self.client.cfg.address.to_string()
    }

    /// The export name.
    pub fn export(&self) -> &str {
        &self.client.cfg.export
    }

    /// Whether the bdev refuses writes (by request or because the server said so).
    pub fn is_read_only(&self) -> bool {
        self.client.read_only()
    }

    /// Whether a connection to the server is up right now.
    pub fn is_connected(&self) -> bool {
        self.client.is_connected()
    }

    /// Number of live connections to the server (more than one only when the server allows
    /// it and `num_connections` asked for it).
    pub fn connections(&self) -> usize {
        self.client.connections()
    }

    fn bytes(&self, offset_blocks: u64) -> Result<u64, BdevError> {
        offset_blocks
            .checked_mul(u64::from(self.client.block_len()))
            .ok_or_else(|| BdevError::InvalidArgument("offset overflows".into()))
    }

    /// Reads or writes `buf` at byte `base`, in pieces no larger than the server's maximum
    /// payload.
    async fn rw(&self, cmd: Cmd, base: u64, buf: IoBuf) -> Result<IoBuf, BdevError> {
        let total = buf.len();
        if base.checked_add(total as u64).is_none() {
            return Err(BdevError::InvalidArgument("range overflows".into()));
        }
        let mut buf = Some(buf);
        let mut done = 0usize;
        while done < total {
            let n = (total - done).min(self.client.max_io_bytes());
            let len = u32::try_from(n)
                .map_err(|_| BdevError::InvalidArgument("request too large".into()))?;
            buf = self
                .client
                .io(cmd, base + done as u64, len, buf.take(), done)
                .await?;
            done += n;
        }
        buf.ok_or_else(|| BdevError::from(NbdError::Disconnected(self.address())))
    }

    /// Sends a payload-free range command in pieces of at most [`MAX_RANGE_BYTES`].
    async fn range(&self, cmd: Cmd, offset_blocks: u64, num_blocks: u64) -> Result<(), BdevError> {
        let bl = u64::from(self.client.block_len());
        let mut off = self.bytes(offset_blocks)?;
        let end = self.bytes(
            offset_blocks
                .checked_add(num_blocks)
                .ok_or_else(|| BdevError::InvalidArgument("range overflows".into()))?,
        )?;
        let step = (MAX_RANGE_BYTES / bl).max(1) * bl;
        while off < end {
            let n = (end - off).min(step);
            self.client.io(cmd, off, n as u32, None, 0).await?;
            off += n;
        }
        Ok(())
    }

    fn writable(&self) -> Result<(), BdevError> {
        if self.client.read_only() {
            return Err(NbdError::ReadOnly(self.client.cfg.name.clone()).into());
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for NbdClientBdev {
    fn name(&self) -> &str {
        &self.client.cfg.name
    }

    fn product_name(&self) -> &str {
        PRODUCT_NAME
    }

    fn module_name(&self) -> &str {
        MODULE_NAME
    }

    fn uuid(&self) -> Uuid {
        self.client.cfg.uuid
    }

    fn block_len(&self) -> u32 {
        self.client.block_len()
    }

    fn num_blocks(&self) -> u64 {
        self.client.num_blocks()
    }

    fn io_type_supported(&self, io_type: IoType) -> bool {
        let rw = !self.client.read_only();
        match io_type {
            IoType::Read => true,
            // Only a server that offers NBD_FLAG_SEND_FLUSH has a cache to write back.
            IoType::Flush => self.client.server_has(proto::TFLAG_SEND_FLUSH),
            IoType::Write => rw,
            IoType::Unmap => rw && self.client.server_has(proto::TFLAG_SEND_TRIM),
            IoType::WriteZeroes => rw && self.client.server_has(proto::TFLAG_SEND_WRITE_ZEROES),
            IoType::Reset | IoType::SeekHole | IoType::SeekData => false,
        }
    }

    async fn read(&self, offset_blocks: u64, buf: IoBuf) -> bdev_core::Result<IoBuf> {
        let base = self.bytes(offset_blocks)?;
        self.rw(Cmd::Read, base, buf).await
    }

    async fn write(&self, offset_blocks: u64, buf: IoBuf) -> bdev_core::Result<IoBuf> {
        self.writable()?;
        let base = self.bytes(offset_blocks)?;
        self.rw(Cmd::Write, base, buf).await
    }

    async fn readv(&self, offset_blocks: u64, bufs: Vec<IoBuf>) -> bdev_core::Result<Vec<IoBuf>> {
        let bl = self.client.block_len();
        all_at_once(bl, offset_blocks, bufs, |off, b| self.read(off, b)).await
    }

    async fn writev(&self, offset_blocks: u64, bufs: Vec<IoBuf>) -> bdev_core::Result<Vec<IoBuf>> {
        self.writable()?;
        let bl = self.client.block_len();
        all_at_once(bl, offset_blocks, bufs, |off, b| self.write(off, b)).await
    }

    async fn flush(&self) -> bdev_core::Result<()> {
        if !self.client.server_has(proto::TFLAG_SEND_FLUSH) {
            return Err(BdevError::NotSupported(IoType::Flush));
        }
        // A read-only export has no writes of ours to make durable.
        if self.client.read_only() {
            return Ok(());
        }
        self.client.io(Cmd::Flush, 0, 0, None, 0).await?;
        Ok(())
    }

    fn has_volatile_cache(&self) -> bool {
        // A server without NBD_FLAG_SEND_FLUSH says it has nothing to write back.
        self.client.server_has(proto::TFLAG_SEND_FLUSH)
    }

    async fn unmap(&self, offset_blocks: u64, num_blocks: u64) -> bdev_core::Result<()> {
        self.writable()?;
        if !self.client.server_has(proto::TFLAG_SEND_TRIM) {
            return Err(BdevError::NotSupported(IoType::Unmap));
        }
        self.range(Cmd::Trim, offset_blocks, num_blocks).await
    }

    async fn write_zeroes(&self, offset_blocks: u64, num_blocks: u64) -> bdev_core::Result<()> {
        self.writable()?;
        if !self.client.server_has(proto::TFLAG_SEND_WRITE_ZEROES) {
            return Err(BdevError::NotSupported(IoType::WriteZeroes));
        }
        self.range(Cmd::WriteZeroes, offset_blocks, num_blocks)
            .await
    }

    fn driver_specific(&self) -> serde_json::Value {
        serde_json::json!({
            "nbd_client": {
                "address": self.address(),
                "export": self.client.cfg.export,
                "read_only": self.client.read_only(),
                "connected": self.client.is_connected(),
            }
        })
    }

    fn write_config(&self) -> Option<serde_json::Value> {
        let cfg = &self.client.cfg;
        Some(serde_json::json!({
            "method": "bdev_nbd_client_create",
            "params": {
                "name": cfg.name,
                "address": cfg.address.to_string(),
                "export": cfg.export,
                "uuid": cfg.uuid.hyphenated().to_string(),
                "read_only": cfg.read_only,
                "reconnect_attempts": cfg.reconnect_attempts,
                "reconnect_delay_ms": cfg.reconnect_delay.as_millis() as u64,
                "io_timeout_ms": cfg.io_timeout.as_millis() as u64,
                "num_connections": cfg.num_connections,
                // A restart must not fail because the server is away at that moment.
                "background_connect": true,
            }
        }))
    }

    async fn destruct(&self) {
        self.client.destructed();
    }
}

/// Vectored I/O as one request a buffer, all sent together (many requests in flight on
/// the connection), each at the block after the previous one's end.
async fn all_at_once<F, Fut>(
    block_len: u32,
    offset_blocks: u64,
    bufs: Vec<IoBuf>,
    mut op: F,
) -> bdev_core::Result<Vec<IoBuf>>
where
    F: FnMut(u64, IoBuf) -> Fut,
    Fut: std::future::Future<Output = bdev_core::Result<IoBuf>>,
{
    let mut off = offset_blocks;
    let mut futs = Vec::with_capacity(bufs.len());
    for b in bufs {
        let blocks = b.len() as u64 / u64::from(block_len);
        futs.push(op(off, b));
        off += blocks;
    }
    futures::future::try_join_all(futs).await
}
