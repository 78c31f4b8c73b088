//! Tasting: the examine hook that looks for a store on every new bdev (and heals degraded
//! esnap clones whose base just arrived), and loading a store with its lvols.

use super::*;

pub(super) struct Hook(pub(super) Weak<Inner>);

#[async_trait]
impl ExamineHook for Hook {
    async fn examine(&self, registry: &Registry, name: &str) {
        let Some(inner) = self.0.upgrade() else {
            return;
        };
        let Some(dev) = registry.get(name) else {
            return;
        };
        let m = LvolModule(inner);
        m.heal_all().await;
        // lvol bdevs may be external snapshots of other stores (healed above), but stores
        // nested on lvols are not looked for.
        if dev.module_name() == "lvol" {
            return;
        }
        match m.load_lvstore(name).await {
            Ok(s) => tracing::info!(target: "lvol", "lvol store {} found on {name}", s.name()),
            Err(e) => tracing::debug!(target: "lvol", "no lvol store on {name}: {e}"),
        }
    }
}

impl LvolModule {
    /// Loads the store on a bdev, registers its lvol bdevs (what tasting does).
    pub async fn load_lvstore(&self, bdev_name: &str) -> Result<Arc<LvolStore>> {
        let mut desc = self.0.registry.open(bdev_name, true)?;
        // Claim before reading anything: if someone else writes the bdev, leave it alone (a
        // failed load after a successful blobstore load unloads, which writes).
        desc.claim(ClaimType::ReadManyWriteOne)?;
        let dev = desc.device().clone();
        let events = desc.take_events();
        let base = Arc::new(BdevBsDev::new(desc));
        let esnap = EsnapCtx::new(self.0.registry.clone());
        let bs_opts = BsOpts {
            bstype: LVS_BSTYPE,
            esnap_factory: Some(Arc::new(Factory(esnap.clone()))),
            ..BsOpts::default()
        };
        let bs = opened_on(&base, &esnap, Blobstore::load(base.clone(), bs_opts).await)?;
        let mut opened: Vec<Blob> = Vec::new();
        let res = self
            .load_inner(&bs, &base, dev.as_ref(), &esnap, &mut opened)
            .await;
        match res {
            Ok((store, guard)) => {
                // The store's name is published by finish_store before the guard goes.
                self.finish_store(&store, events);
                drop(guard);
                store.refresh_esnap_holders();
                for l in store.lvols_by_blob_id() {
                    if let Err(e) = self.register_bdev(&store, &l).await {
                        tracing::warn!(target: "lvol", "registering lvol {}: {e}", l.name());
                    }
                }
                Ok(store)
            }
            Err(e) => {
                // The blobstore loaded and says it is an lvol store, so this is a damaged or
                // duplicate store, not a bdev without one: say so above debug level.
                tracing::warn!(
                    target: "lvol",
                    "{bdev_name} holds an lvol store that cannot be loaded: {e}"
                );
                for b in opened.into_iter().rev() {
                    let _ = b.close().await;
                }
                esnap.close_all();
                let _ = bs.unload().await;
                base.close();
                Err(e)
            }
        }
    }

    pub(super) async fn load_inner(
        &self,
        bs: &Blobstore,
        base: &Arc<BdevBsDev>,
        dev: &dyn BlockDevice,
        esnap: &Arc<EsnapCtx>,
        opened: &mut Vec<Blob>,
    ) -> Result<(Arc<LvolStore>, StoreNameGuard<'_>)> {
        let super_id = bs
            .super_blob()
            .ok_or_else(|| LvolError::NoDevice("lvol store has no super blob".into()))?;
        // An I/O error reading the super blob is reported as such (EIO); only a super blob
        // that is not there (or not readable as a blob) means "no lvol store here".
        let sb = bs.open_blob(super_id).await.map_err(|e| match e.errno() {
            libc::EIO => LvolError::from(e),
            _ => LvolError::NoDevice(format!("super blob: {e}")),
        })?;
        let uuid_v = sb.get_xattr("uuid");
        let name_v = sb.get_xattr("name");
        let _ = sb.close().await;
        let uuid = uuid_v
            .ok()
            .and_then(|v| crate::esnap::parse_esnap_id(&v))
            .ok_or_else(|| LvolError::InvalidArgument("bad lvol store uuid".into()))?;
        let name = name_v
            .ok()
            .and_then(|v| name_from_xattr(&v))
            .ok_or_else(|| LvolError::InvalidArgument("bad lvol store name".into()))?;
        let guard = self.reserve_store_name(&name)?;
        if self.lvstore_by_uuid(&uuid).is_some() {
            return Err(LvolError::AlreadyExists(format!("lvol store {uuid}")));
        }
        let store = Arc::new(LvolStore {
            uuid,
            name: Mutex::new(name),
            base_name: dev.name().to_string(),
            base: base.clone(),
            bs: bs.clone(),
            super_blob: super_id,
            lvols: Mutex::new(LvolMaps::default()),
            esnap: esnap.clone(),
            stop_listener: Mutex::new(None),
            seq: next_seq(),
        });
        let mut pending = Vec::new();
        for id in bs.blob_ids() {
            if id == super_id {
                continue;
            }
            let blob = bs.open_blob(id).await?;
            if blob.get_xattr(PENDING_DELETE_XATTR).is_ok() {
                blob.close().await?;
                pending.push(id);
                continue;
            }
            opened.push(blob.clone());
            let lname = blob
                .get_xattr("name")
                .ok()
                .and_then(|v| name_from_xattr(&v))
                .ok_or_else(|| LvolError::InvalidArgument(format!("blob {id:#x} has no name")))?;
            let luuid = blob
                .get_xattr("uuid")
                .ok()
                .and_then(|v| crate::esnap::parse_esnap_id(&v));
            let (luuid, unique_id) = match luuid {
                Some(u) => (u, u.hyphenated().to_string()),
                None => (Uuid::nil(), format!("{}_{}", uuid.hyphenated(), id)),
            };
            let lvol = new_lvol(&store, blob, id, luuid, unique_id, lname.clone());
            let mut maps = store.maps();
            if maps.by_name.contains_key(&lname) {
                return Err(LvolError::AlreadyExists(format!("lvol {lname}")));
            }
            maps.by_name.insert(lname, lvol.clone());
            maps.by_blob.insert(id, lvol);
        }
        // Finish the creates and deletes that did not complete. A failure leaves the blob
        // marked (and unlisted) for the next load.
        for id in pending {
            match bs.delete_blob(id).await {
                Ok(()) => tracing::info!(target: "lvol", "deleted uncommitted blob {id:#x}"),
                Err(e) => {
                    tracing::warn!(target: "lvol", "deleting uncommitted blob {id:#x}: {e}")
                }
            }
        }
        Ok((store, guard))
    }

    /// Heals every degraded esnap holder whose base bdev is registered now. Called by the
    /// examine hook on every new bdev; returns the number of lvols healed.
    pub async fn heal_all(&self) -> usize {
        let mut healed = 0;
        for store in self.lvstores() {
            let ids: Vec<Vec<u8>> = store
                .esnap
                .map
                .lock()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            for id in ids {
                let Some(u) = crate::esnap::parse_esnap_id(&id) else {
                    continue;
                };
                if self.0.registry.get_by_uuid(&u).is_none() && store.esnap.is_missing(&id) {
                    continue;
                }
                healed += store.esnap.heal(&id).await;
            }
        }
        healed
    }
}
