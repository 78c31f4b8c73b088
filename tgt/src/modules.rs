//! The wiring: which RPC modules, config writers and shutdown hooks the target runs. Adding a
//! module is one line in [`wiring`].

use std::sync::Arc;

use bdev_core::rpc::RpcModule;
use bdev_core::Registry;
use futures::future::BoxFuture;
use serde_json::Value;

use crate::bdev_rpc::BdevRpc;
use crate::nbd::rpc::NbdRpc;
use crate::nbd::server::NbdServer;

/// Extra `bdev` subsystem config entries a module keeps outside the registry.
pub type ConfigWriter = Arc<dyn Fn() -> Vec<Value> + Send + Sync>;
/// Work a module does at shutdown, after every bdev was unregistered.
pub type ShutdownHook = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// What the target serves.
#[derive(Default)]
pub struct Wiring {
    /// Every RPC module, in the order `rpc_get_methods` lists them.
    pub modules: Vec<Arc<dyn RpcModule>>,
    /// Config entries of devices the registry does not hold (yet), put right after
    /// `bdev_set_options`.
    pub config_writers: Vec<ConfigWriter>,
    /// Shutdown hooks.
    pub shutdown_hooks: Vec<ShutdownHook>,
}

/// The target's modules. Creating the lvol module installs its examine hook (tasting), so
/// this runs before any device is registered.
pub fn wiring(registry: &Registry, nbd: &Arc<NbdServer>) -> Wiring {
    wiring_with_lvol(registry, nbd).0
}

/// [`wiring`], and a handle on the lvol module it created (for the metrics endpoint).
pub fn wiring_with_lvol(registry: &Registry, nbd: &Arc<NbdServer>) -> (Wiring, lvol::LvolModule) {
    let lvol = lvol::LvolModule::new(registry.clone());
    let lvol_handle = lvol.clone();
    let nbd_clients = Arc::new(bdev_nbd::NbdClients::new(registry.clone()));
    let (c1, c2) = (nbd_clients.clone(), nbd_clients.clone());
    // bdev-core's own modules first: the bdev layer and the malloc, aio, error, null backends.
    let mut modules = bdev_core::config::core_modules(registry);
    modules.extend([
        BdevRpc::new(registry.clone()) as Arc<dyn RpcModule>,
        Arc::new(lvol::rpc::LvolRpc::new(lvol)),
        NbdRpc::new(nbd.clone()),
        Arc::new(vbdev_ro::RoRpc::new(registry.clone())),
        Arc::new(bdev_nbd::NbdRpc::with_clients(nbd_clients)),
        crate::iostat::IostatRpc::new(registry.clone()),
    ]);
    let w = Wiring {
        modules,
        // NBD client bdevs waiting for their server are not in the registry but must be saved.
        config_writers: vec![Arc::new(move || c1.unregistered_config())],
        // Their supervisor threads stop.
        shutdown_hooks: vec![Arc::new(move || {
            let c = c2.clone();
            Box::pin(async move { c.delete_all().await })
        })],
    };
    (w, lvol_handle)
}
