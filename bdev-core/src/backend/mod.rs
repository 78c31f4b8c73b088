//! Backends: `malloc` (RAM), `aio` (file or block device; io_uring or a thread pool), the
//! error-injection bdev, and `cached` (RAM behind a volatile write cache, for crash tests). Each implements [`crate::BlockDevice`] and describes itself for
//! `bdev_get_bdevs` (`driver_specific`) and `save_config` (`write_config`).
//! Each backend's JSON-RPC methods sit next to it (`*_rpc.rs`, one [`crate::rpc::RpcModule`]
//! each), so a config replay without a socket (`crate::config`) and the target serve the same
//! handlers.

pub mod aio;
pub mod aio_rpc;
pub mod cached;
pub mod copy;
pub mod error;
pub mod error_rpc;
pub mod malloc;
pub mod malloc_rpc;
pub mod null;
pub mod null_rpc;
pub(crate) mod uring;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::rpc::{decode, delete_of_module, errno_err, NameOnly, RpcError};
use crate::{BlockDevice, Registry};

/// What a backend's RPC module holds: the registry, and the devices it created, by name, for
/// its own methods that need the concrete type (null resize, aio rescan, error injection).
/// Weak: the registry owns the devices; an unregistered one is forgotten.
pub(crate) struct RpcDevs<T> {
    pub(crate) registry: Registry,
    devs: Mutex<HashMap<String, Weak<T>>>,
}

impl<T: BlockDevice> RpcDevs<T> {
    pub(crate) fn new(registry: Registry) -> Self {
        RpcDevs {
            registry,
            devs: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Weak<T>>> {
        self.devs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `dev` and keeps it under its name.
    pub(crate) async fn register(&self, dev: Arc<T>) -> Result<(), RpcError> {
        self.registry
            .register(dev.clone())
            .await
            .map_err(|e| errno_err(&e))?;
        self.lock()
            .insert(dev.name().to_string(), Arc::downgrade(&dev));
        Ok(())
    }

    /// The kept device registered as `name` (its name, an alias or its UUID): `-19` (ENODEV)
    /// when nothing is registered so, `None` when the device is not one of ours.
    pub(crate) fn find(&self, name: &str) -> Result<Option<Arc<T>>, RpcError> {
        let dev = self
            .registry
            .get(name)
            .ok_or_else(|| RpcError::from_errno(libc::ENODEV))?;
        let mut map = self.lock();
        map.retain(|n, _| self.registry.get(n).is_some());
        Ok(map.get(dev.name()).and_then(Weak::upgrade))
    }

    /// `bdev_<module>_delete`: unregisters the device (if it is one of `module`'s) and
    /// forgets it.
    pub(crate) async fn delete(
        &self,
        params: Option<serde_json::Value>,
        module: &str,
    ) -> Result<serde_json::Value, RpcError> {
        let p: NameOnly = decode(params)?;
        let r = delete_of_module(&self.registry, &p.name, module).await;
        self.lock().remove(&p.name);
        r
    }
}
