//! Store lifecycle: create, publish, unload, destroy, rename and grow a store, and the
//! registration of lvol bdevs that every store operation shares.

use super::*;

impl LvolModule {
    pub(super) fn reserve_store_name(&self, name: &str) -> Result<StoreNameGuard<'_>> {
        check_name(name)?;
        let mut maps = lock(&self.0.stores);
        if maps.by_name.contains_key(name) || maps.pending.contains(name) {
            return Err(LvolError::AlreadyExists(format!("lvol store {name}")));
        }
        maps.pending.insert(name.to_string());
        Ok(StoreNameGuard {
            m: &self.0,
            name: name.to_string(),
        })
    }

    /// Creates a store on a bdev (SPDK `bdev_lvol_create_lvstore`).
    pub async fn create_lvstore(&self, bdev_name: &str, opts: LvsOpts) -> Result<Arc<LvolStore>> {
        let guard = self.reserve_store_name(&opts.name)?;
        let mut desc = self.0.registry.open(bdev_name, true)?;
        let dev = desc.device().clone();
        let bl = dev.block_len();
        if opts.cluster_size < bl || opts.cluster_size.checked_rem(bl) != Some(0) {
            return Err(LvolError::InvalidArgument(format!(
                "cluster size {} is not a multiple of the block size {bl}",
                opts.cluster_size
            )));
        }
        if opts.md_page_size != 0 && opts.md_page_size != 4096 {
            return Err(LvolError::InvalidArgument(format!(
                "md page size {} is not supported",
                opts.md_page_size
            )));
        }
        desc.claim(ClaimType::ReadManyWriteOne)?;
        let events = desc.take_events();
        let base = Arc::new(BdevBsDev::new(desc));
        let esnap = EsnapCtx::new(self.0.registry.clone());
        let total_clusters = dev.num_blocks() * u64::from(bl) / u64::from(opts.cluster_size);
        let md_pages = u64::from(opts.md_pages_ratio) * total_clusters / 100;
        let bs_opts = BsOpts {
            cluster_size: opts.cluster_size,
            num_md_pages: Some(md_pages.min(u64::from(u32::MAX)) as u32),
            bstype: LVS_BSTYPE,
            clear_method: match opts.clear_method {
                LvsClearMethod::Unmap => ClearMethod::Unmap,
                LvsClearMethod::WriteZeroes => ClearMethod::WriteZeroes,
                LvsClearMethod::None => ClearMethod::None,
            },
            force_recover: false,
            esnap_factory: Some(Arc::new(Factory(esnap.clone()))),
        };
        let bs = opened_on(&base, &esnap, Blobstore::init(base.clone(), bs_opts).await)?;
        let uuid = Uuid::new_v4();
        let super_opts = BlobOpts {
            // SPDK's order on the super blob: uuid, then name.
            xattrs: vec![
                ("uuid".to_string(), uuid_xattr(&uuid)),
                ("name".to_string(), name_xattr(&opts.name)),
            ],
            ..BlobOpts::default()
        };
        let super_id = match async {
            let id = bs.create_blob(super_opts).await?;
            bs.set_super_blob(id).await?;
            Ok::<_, blobstore::BsError>(id)
        }
        .await
        {
            Ok(id) => id,
            Err(e) => {
                let _ = bs.unload().await;
                base.close();
                return Err(e.into());
            }
        };
        let store = Arc::new(LvolStore {
            uuid,
            name: Mutex::new(opts.name.clone()),
            base_name: dev.name().to_string(),
            base,
            bs,
            super_blob: super_id,
            lvols: Mutex::new(LvolMaps::default()),
            esnap,
            stop_listener: Mutex::new(None),
            seq: next_seq(),
        });
        self.finish_store(&store, events);
        drop(guard);
        tracing::info!(target: "lvol", "lvol store {} created on {bdev_name}", opts.name);
        Ok(store)
    }

    /// Publishes a store and starts following its base's events.
    pub(super) fn finish_store(
        &self,
        store: &Arc<LvolStore>,
        events: Option<UnboundedReceiver<BdevEvent>>,
    ) {
        {
            let mut maps = lock(&self.0.stores);
            maps.by_name.insert(store.name(), store.clone());
            maps.by_uuid.insert(store.uuid, store.clone());
        }
        if let Some(events) = events {
            let (tx, rx) = oneshot::channel::<()>();
            *lock(&store.stop_listener) = Some(tx);
            let weak_m = Arc::downgrade(&self.0);
            let weak_s = Arc::downgrade(store);
            self.0.registry.spawn(Box::pin(async move {
                if !crate::bs_dev::until_removed(events, rx).await {
                    return;
                }
                if let (Some(m), Some(s)) = (weak_m.upgrade(), weak_s.upgrade()) {
                    tracing::info!(target: "lvol", "base of lvol store {} removed", s.name());
                    if let Err(e) = LvolModule(m).close_store(&s, false, true).await {
                        tracing::warn!(target: "lvol", "unloading {}: {e}", s.name());
                    }
                }
            }));
        }
    }

    /// Registers the bdev of an lvol (name = unique id, alias `lvs/lvol`).
    pub(super) async fn register_bdev(
        &self,
        store: &Arc<LvolStore>,
        lvol: &Arc<Lvol>,
    ) -> Result<()> {
        {
            let mut lvols = lock(&self.0.lvols);
            if lvols.contains_key(&lvol.unique_id) {
                return Err(LvolError::AlreadyExists(format!("lvol {}", lvol.unique_id)));
            }
            lvols.insert(lvol.unique_id.clone(), lvol.clone());
        }
        let bdev = Arc::new(LvolBdev::new(lvol.clone(), store, self.0.retry.clone()));
        if let Err(e) = self.0.registry.register(bdev).await {
            lock(&self.0.lvols).remove(&lvol.unique_id);
            return Err(e.into());
        }
        if let Err(e) = self.0.registry.add_alias(&lvol.unique_id, &lvol.alias()) {
            let _ = self.0.registry.unregister(&lvol.unique_id).await;
            lock(&self.0.lvols).remove(&lvol.unique_id);
            return Err(e.into());
        }
        lvol.registered.store(true, Ordering::SeqCst);
        Ok(())
    }

    pub(super) async fn unregister_bdev(&self, lvol: &Arc<Lvol>) {
        if lvol.registered.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.0.registry.unregister(&lvol.unique_id).await {
                tracing::warn!(target: "lvol", "unregistering {}: {e}", lvol.unique_id);
            }
        }
        let mut lvols = lock(&self.0.lvols);
        if lvols
            .get(&lvol.unique_id)
            .is_some_and(|l| Arc::ptr_eq(l, lvol))
        {
            lvols.remove(&lvol.unique_id);
        }
    }

    /// Unregisters the lvol bdevs, closes the blobs and unloads (or destroys) the store.
    pub(super) async fn close_store(
        &self,
        store: &Arc<LvolStore>,
        destroy: bool,
        removed: bool,
    ) -> Result<()> {
        {
            let mut maps = lock(&self.0.stores);
            let name = store.name();
            if maps
                .by_name
                .get(&name)
                .is_some_and(|s| Arc::ptr_eq(s, store))
            {
                maps.by_name.remove(&name);
            }
            maps.by_uuid.remove(&store.uuid);
        }
        if !removed {
            store.stop_listening();
        }
        for l in store.lvols_by_blob_id().iter().rev() {
            self.unregister_bdev(l).await;
        }
        store.close(destroy).await
    }

    /// Unregisters the store's lvol bdevs and unloads it cleanly; the base bdev is released.
    /// Re-adding (or re-examining) the base brings it back.
    pub async fn unload_lvstore(&self, store: &Arc<LvolStore>) -> Result<()> {
        self.close_store(store, false, false).await
    }

    /// Destroys a store: its lvol bdevs go away and the super block is erased.
    pub async fn destroy_lvstore(&self, store: &Arc<LvolStore>) -> Result<()> {
        self.close_store(store, true, false).await
    }

    /// Renames a store; the aliases of its lvol bdevs follow.
    pub async fn rename_lvstore(&self, store: &Arc<LvolStore>, new_name: &str) -> Result<()> {
        let old = store.name();
        if old == new_name {
            return Ok(());
        }
        let guard = self.reserve_store_name(new_name)?;
        let lvols = store.lvols();
        let old_aliases: Vec<String> = lvols.iter().map(|l| l.alias()).collect();
        store.rename(new_name, &name_xattr(new_name)).await?;
        {
            let mut maps = lock(&self.0.stores);
            maps.by_name.remove(&old);
            maps.by_name.insert(new_name.to_string(), store.clone());
        }
        drop(guard);
        for (l, old_alias) in lvols.iter().zip(old_aliases) {
            if l.is_registered() {
                let _ = self.0.registry.remove_alias(&l.unique_id, &old_alias);
                if let Err(e) = self.0.registry.add_alias(&l.unique_id, &l.alias()) {
                    tracing::warn!(target: "lvol", "alias {}: {e}", l.alias());
                }
            }
        }
        Ok(())
    }

    /// Grows the store onto its base's current size.
    pub async fn grow_lvstore(&self, store: &Arc<LvolStore>) -> Result<()> {
        store.grow().await
    }
}
