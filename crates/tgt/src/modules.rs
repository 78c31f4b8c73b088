//! The wiring: which RPC modules and examine hooks the target runs. Adding a module is one
//! line in [`rpc_modules`].

use std::sync::Arc;

use bdev_core::rpc::RpcModule;
use bdev_core::Registry;

use crate::bdev_rpc::BdevRpc;
use crate::nbd::rpc::NbdRpc;
use crate::nbd::server::NbdServer;

/// Every RPC module, in the order `rpc_get_methods` lists them.
pub fn rpc_modules(registry: &Registry, nbd: &Arc<NbdServer>) -> Vec<Arc<dyn RpcModule>> {
    vec![
        BdevRpc::new(registry.clone()),
        NbdRpc::new(nbd.clone()),
        Arc::new(vbdev_ro::RoRpc::new(registry.clone())),
    ]
}

/// Installs the modules' examine hooks (lvol tasting) on the registry.
pub fn install_examine_hooks(registry: &Registry) {
    let _ = registry;
}
