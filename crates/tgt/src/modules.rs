//! The wiring: which RPC modules and examine hooks the target runs. Adding a module is one
//! line in [`rpc_modules`].

use std::sync::Arc;

use bdev_core::rpc::RpcModule;
use bdev_core::Registry;

use crate::bdev_rpc::BdevRpc;
use crate::nbd::rpc::NbdRpc;
use crate::nbd::server::NbdServer;

/// Every RPC module, in the order `rpc_get_methods` lists them. Creating the lvol module
/// installs its examine hook (tasting), so this runs before any device is registered.
pub fn rpc_modules(registry: &Registry, nbd: &Arc<NbdServer>) -> Vec<Arc<dyn RpcModule>> {
    let lvol = lvol::LvolModule::new(registry.clone());
    vec![
        BdevRpc::new(registry.clone()),
        Arc::new(lvol::rpc::LvolRpc::new(lvol)),
        NbdRpc::new(nbd.clone()),
        Arc::new(vbdev_ro::RoRpc::new(registry.clone())),
        Arc::new(bdev_nbd::NbdRpc::new(registry.clone())),
    ]
}

/// Installs examine hooks of modules that have no RPC module (none today: the lvol module
/// installs its own hook when [`rpc_modules`] creates it).
pub fn install_examine_hooks(registry: &Registry) {
    let _ = registry;
}
