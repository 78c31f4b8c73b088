//! Lvol operations: create (thick, thin, snapshot, clone, esnap clone) with its commit
//! protocol (the `pending_delete` mark), rename, resize, read-only, inflate, decouple,
//! set_parent, set_parent_bdev, delete and its rollback.

use super::*;

impl LvolModule {
    pub(super) async fn attach(
        &self,
        store: &Arc<LvolStore>,
        id: BlobId,
        uuid: Uuid,
        name: &str,
    ) -> Result<Arc<Lvol>> {
        let blob = store.bs.open_blob(id).await?;
        self.publish(store, blob, id, uuid, name).await
    }

    /// Lists an lvol on an open blob and registers its bdev; on failure the blob is closed.
    pub(super) async fn publish(
        &self,
        store: &Arc<LvolStore>,
        blob: Blob,
        id: BlobId,
        uuid: Uuid,
        name: &str,
    ) -> Result<Arc<Lvol>> {
        let lvol = new_lvol(
            store,
            blob,
            id,
            uuid,
            uuid.hyphenated().to_string(),
            name.to_string(),
        );
        {
            let mut maps = store.maps();
            maps.by_name.insert(name.to_string(), lvol.clone());
            maps.by_blob.insert(id, lvol.clone());
        }
        store.refresh_esnap_holders();
        if let Err(e) = self.register_bdev(store, &lvol).await {
            {
                let mut maps = store.maps();
                maps.by_name.remove(name);
                maps.by_blob.remove(&id);
            }
            let _ = lvol.blob.clone().close().await;
            return Err(e);
        }
        Ok(lvol)
    }

    pub(super) fn new_lvol_xattrs(name: &str, uuid: &Uuid) -> Vec<(String, Vec<u8>)> {
        vec![
            ("name".to_string(), name_xattr_padded(name)),
            ("uuid".to_string(), uuid_xattr(uuid)),
        ]
    }

    /// The xattrs of a blob made by a create: those of an lvol plus the pending-delete mark
    /// that [`commit_new`](Self::commit_new) removes.
    pub(super) fn uncommitted_lvol_xattrs(name: &str, uuid: &Uuid) -> Vec<(String, Vec<u8>)> {
        let mut v = Self::new_lvol_xattrs(name, uuid);
        v.push((PENDING_DELETE_XATTR.to_string(), vec![1]));
        v
    }

    /// Turns a blob just created with [`uncommitted_lvol_xattrs`](Self::uncommitted_lvol_xattrs)
    /// into a listed lvol with a registered bdev, then commits it by removing the mark.
    ///
    /// On any failure the create is rolled back: the lvol is unlisted, its bdev unregistered
    /// and the blob deleted. If the device fails the rollback too (a read error at the open
    /// fails the delete as well), the blob stays on disk with its mark and is not listed: the
    /// create is reported failed, and the next load deletes the blob, so what the process
    /// shows and what a reload finds agree.
    pub(super) async fn commit_new(
        &self,
        store: &Arc<LvolStore>,
        id: BlobId,
        uuid: Uuid,
        name: &str,
    ) -> Result<Arc<Lvol>> {
        let blob = match store.bs.open_blob(id).await {
            Ok(b) => b,
            Err(e) => {
                self.discard_uncommitted(store, None, id).await;
                return Err(e.into());
            }
        };
        let lvol = match self.publish(store, blob.clone(), id, uuid, name).await {
            Ok(l) => l,
            Err(e) => {
                // publish closed the blob.
                self.discard_uncommitted(store, None, id).await;
                return Err(e);
            }
        };
        let res = async {
            lvol.blob.remove_xattr(PENDING_DELETE_XATTR)?;
            lvol.blob.sync_md().await
        }
        .await;
        if let Err(e) = res {
            let _ = lvol.blob.set_xattr(PENDING_DELETE_XATTR, &[1]);
            self.unregister_bdev(&lvol).await;
            {
                let mut maps = store.maps();
                maps.by_name.remove(name);
                maps.by_blob.remove(&id);
            }
            self.discard_uncommitted(store, Some(lvol.blob.clone()), id)
                .await;
            store.refresh_esnap_holders();
            return Err(e.into());
        }
        Ok(lvol)
    }

    /// Closes (if `blob` is given) and deletes a marked blob that is not listed. A blob that
    /// cannot be closed is kept as an orphan until the store closes; one that cannot be
    /// deleted stays marked on disk for the next load.
    pub(super) async fn discard_uncommitted(
        &self,
        store: &Arc<LvolStore>,
        blob: Option<Blob>,
        id: BlobId,
    ) {
        if let Some(b) = blob {
            if let Err(e) = b.clone().close().await {
                tracing::warn!(target: "lvol", "closing uncommitted blob {id:#x}: {e}");
                store.maps().orphans.push(b);
                return;
            }
        }
        if let Err(e) = store.bs.delete_blob(id).await {
            tracing::warn!(
                target: "lvol",
                "deleting uncommitted blob {id:#x}: {e}; the next load deletes it"
            );
        }
    }

    /// Creates an lvol of `size_bytes` (rounded up to whole clusters), thick or thin.
    pub async fn create_lvol(
        &self,
        store: &Arc<LvolStore>,
        name: &str,
        size_bytes: u64,
        thin: bool,
        clear_method: ClearMethod,
    ) -> Result<Arc<Lvol>> {
        let _guard = reserve_lvol_name(store, name)?;
        let uuid = Uuid::new_v4();
        let opts = BlobOpts {
            num_clusters: div_ceil(size_bytes, u64::from(store.cluster_size())),
            thin,
            clear_method,
            xattrs: Self::uncommitted_lvol_xattrs(name, &uuid),
            ..BlobOpts::default()
        };
        let id = store.bs.create_blob(opts).await?;
        self.commit_new(store, id, uuid, name).await
    }

    /// Snapshots an lvol; the lvol becomes a clone of the new snapshot.
    pub async fn create_snapshot(&self, lvol: &Arc<Lvol>, name: &str) -> Result<Arc<Lvol>> {
        let (store, _guard) = child_of(lvol, name, false, "cannot snapshot a read-only lvol")?;
        let uuid = Uuid::new_v4();
        let id = store
            .bs
            .create_snapshot(lvol.blob_id, Self::new_lvol_xattrs(name, &uuid))
            .await?;
        let snap = self.attach(&store, id, uuid, name).await?;
        store.refresh_esnap_holders();
        Ok(snap)
    }

    /// Clones a read-only lvol (a snapshot).
    pub async fn create_clone(&self, snap: &Arc<Lvol>, name: &str) -> Result<Arc<Lvol>> {
        let (store, _guard) = child_of(snap, name, true, "clone source is not read-only")?;
        let uuid = Uuid::new_v4();
        let id = store
            .bs
            .create_clone(snap.blob_id, Self::uncommitted_lvol_xattrs(name, &uuid))
            .await?;
        self.commit_new(&store, id, uuid, name).await
    }

    /// Creates an esnap clone of any bdev (by name, alias or UUID): a thin lvol of the bdev's
    /// size whose unallocated clusters read from it.
    pub async fn create_esnap_clone(
        &self,
        bdev: &str,
        store: &Arc<LvolStore>,
        name: &str,
    ) -> Result<Arc<Lvol>> {
        let desc = self.0.registry.open(bdev, false)?;
        let dev = desc.device().clone();
        drop(desc);
        let _guard = reserve_lvol_name(store, name)?;
        check_base_block(store, dev.as_ref())?;
        let size = dev.num_blocks() * u64::from(dev.block_len());
        let cs = u64::from(store.cluster_size());
        if size.checked_rem(cs) != Some(0) {
            return Err(LvolError::InvalidArgument(format!(
                "bdev size {size} is not a multiple of the cluster size {cs}"
            )));
        }
        let uuid = Uuid::new_v4();
        let opts = BlobOpts {
            num_clusters: size / cs,
            thin: true,
            xattrs: Self::uncommitted_lvol_xattrs(name, &uuid),
            esnap_id: Some(esnap_id_for(&dev.uuid())),
            ..BlobOpts::default()
        };
        let id = store.bs.create_blob(opts).await?;
        let res = self.commit_new(store, id, uuid, name).await;
        store.refresh_esnap_holders();
        res
    }

    /// Renames an lvol; its bdev alias follows. Renaming to the same name succeeds.
    pub async fn rename_lvol(&self, lvol: &Arc<Lvol>, new_name: &str) -> Result<()> {
        let old = lvol.name();
        if old == new_name {
            return Ok(());
        }
        let store = lvol.require_store()?;
        let _guard = reserve_lvol_name(&store, new_name)?;
        let old_alias = lvol.alias();
        let new_alias = format!("{}/{}", store.name(), new_name);
        if lvol.is_registered() {
            self.0.registry.add_alias(&lvol.unique_id, &new_alias)?;
        }
        let res = async {
            lvol.blob.set_xattr("name", &name_xattr(new_name))?;
            lvol.blob.sync_md().await
        }
        .await;
        if let Err(e) = res {
            if lvol.is_registered() {
                let _ = self.0.registry.remove_alias(&lvol.unique_id, &new_alias);
            }
            let _ = lvol.blob.set_xattr("name", &name_xattr(&old));
            return Err(e.into());
        }
        if lvol.is_registered() {
            let _ = self.0.registry.remove_alias(&lvol.unique_id, &old_alias);
        }
        if let Ok(mut n) = lvol.name.lock() {
            *n = new_name.to_string();
        }
        let mut maps = store.maps();
        maps.by_name.remove(&old);
        maps.by_name.insert(new_name.to_string(), lvol.clone());
        Ok(())
    }

    /// Resizes an lvol to `size_bytes` rounded up to whole clusters.
    pub async fn resize_lvol(&self, lvol: &Arc<Lvol>, size_bytes: u64) -> Result<()> {
        let store = lvol.require_store()?;
        if lvol.is_read_only() {
            return Err(LvolError::NotPermitted("lvol is read-only".into()));
        }
        let n = div_ceil(size_bytes, u64::from(store.cluster_size()));
        let res = async {
            lvol.blob.resize(n).await?;
            lvol.blob.sync_md().await
        }
        .await;
        lvol.refresh_size();
        res?;
        if lvol.is_registered() {
            self.0.registry.notify_resize(&lvol.unique_id);
        }
        Ok(())
    }

    /// Makes an lvol read-only.
    pub async fn set_read_only(&self, lvol: &Arc<Lvol>) -> Result<()> {
        lvol.blob.set_read_only()?;
        lvol.blob.sync_md().await?;
        Ok(())
    }

    /// Allocates every cluster of an lvol and cuts it from its parent.
    pub async fn inflate_lvol(&self, lvol: &Arc<Lvol>) -> Result<()> {
        let store = lvol.require_store()?;
        let res = store.bs.inflate_blob(lvol.blob_id).await;
        store.refresh_esnap_holders();
        res.map_err(Into::into)
    }

    /// Copies the parent's clusters into an lvol and re-points it to the grandparent.
    pub async fn decouple_parent(&self, lvol: &Arc<Lvol>) -> Result<()> {
        let store = lvol.require_store()?;
        if matches!(lvol.blob.parent(), Parent::None | Parent::Zeroes) {
            return Err(LvolError::InvalidArgument("lvol has no parent".into()));
        }
        let res = store.bs.decouple_parent(lvol.blob_id).await;
        store.refresh_esnap_holders();
        res.map_err(Into::into)
    }

    /// Re-parents a thin lvol onto a snapshot of the same store.
    pub async fn set_parent(&self, lvol: &Arc<Lvol>, snap: &Arc<Lvol>) -> Result<()> {
        let store = lvol.require_store()?;
        let same = snap.store().is_some_and(|s| Arc::ptr_eq(&s, &store));
        if !same {
            return Err(LvolError::InvalidArgument(
                "parent is in another lvol store".into(),
            ));
        }
        let res = store.bs.set_parent(lvol.blob_id, snap.blob_id).await;
        store.refresh_esnap_holders();
        res.map_err(Into::into)
    }

    /// Makes a thin lvol an esnap clone of a bdev (by name or UUID).
    pub async fn set_parent_bdev(&self, lvol: &Arc<Lvol>, bdev: &str) -> Result<()> {
        let store = lvol.require_store()?;
        let dev = self
            .0
            .registry
            .get(bdev)
            .ok_or_else(|| LvolError::NoDevice(bdev.to_string()))?;
        if dev.uuid() == lvol.uuid {
            return Err(LvolError::InvalidArgument("bdev is the lvol itself".into()));
        }
        check_base_block(&store, dev.as_ref())?;
        let size = dev.num_blocks() * u64::from(dev.block_len());
        if size.checked_rem(u64::from(store.cluster_size())) != Some(0) {
            return Err(LvolError::InvalidArgument(
                "bdev size is not a multiple of the cluster size".into(),
            ));
        }
        if !lvol.is_thin() {
            return Err(LvolError::InvalidArgument("lvol is not thin".into()));
        }
        let id = esnap_id_for(&dev.uuid());
        if lvol.blob.parent() == Parent::External(id.clone()) {
            return Err(LvolError::AlreadyExists("external parent".into()));
        }
        let esdev = store
            .esnap
            .get_or_open(&id)
            .map_err(|e| LvolError::NoDevice(format!("{bdev}: {e}")))?;
        let res = store.bs.set_external_parent(lvol.blob_id, esdev, &id).await;
        store.refresh_esnap_holders();
        res.map_err(Into::into)
    }

    /// Deletes an lvol. A snapshot with two or more clones is refused with EPERM.
    pub async fn delete_lvol(&self, lvol: &Arc<Lvol>) -> Result<()> {
        let store = lvol.require_store()?;
        if store.bs.clones_of(lvol.blob_id).len() > 1 {
            return Err(LvolError::NotPermitted(
                "snapshot has more than one clone".into(),
            ));
        }
        let name = lvol.name();
        // Write the pending-delete mark first (snapshots have read-only metadata and go
        // without): once it is on disk, a delete that fails below after the blob was closed
        // and could not be re-opened is finished by the next load instead of leaving an lvol
        // that the process no longer lists.
        let marked = lvol.blob.set_xattr(PENDING_DELETE_XATTR, &[1]).is_ok();
        if marked {
            if let Err(e) = lvol.blob.sync_md().await {
                // Nothing changed on disk: the lvol stays as it was.
                let _ = lvol.blob.remove_xattr(PENDING_DELETE_XATTR);
                return Err(e.into());
            }
        }
        self.unregister_bdev(lvol).await;
        {
            let mut maps = store.maps();
            maps.by_name.remove(&name);
            maps.by_blob.remove(&lvol.blob_id);
        }
        if let Err(e) = lvol.blob.clone().close().await {
            tracing::warn!(target: "lvol", "closing {name}: {e}");
        }
        match store.bs.delete_blob(lvol.blob_id).await {
            Ok(()) => {
                store.refresh_esnap_holders();
                Ok(())
            }
            Err(e) => {
                self.restore_after_failed_delete(&store, lvol, &name, marked)
                    .await;
                store.refresh_esnap_holders();
                Err(e.into())
            }
        }
    }

    /// Brings an lvol whose delete failed back as it was (listed, bdev registered, mark
    /// removed). When the device does not allow that, the lvol stays unlisted and marked on
    /// disk, and the next load finishes the delete.
    pub(super) async fn restore_after_failed_delete(
        &self,
        store: &Arc<LvolStore>,
        lvol: &Arc<Lvol>,
        name: &str,
        marked: bool,
    ) {
        let id = lvol.blob_id;
        let blob = match store.bs.open_blob(id).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(
                    target: "lvol",
                    "re-opening {name} after a failed delete: {e}; the next load deletes it"
                );
                return;
            }
        };
        if marked {
            let res = async {
                blob.remove_xattr(PENDING_DELETE_XATTR)?;
                blob.sync_md().await
            }
            .await;
            if let Err(e) = res {
                tracing::warn!(
                    target: "lvol",
                    "unmarking {name} after a failed delete: {e}; the next load deletes it"
                );
                let _ = blob.set_xattr(PENDING_DELETE_XATTR, &[1]);
                self.discard_uncommitted(store, Some(blob), id).await;
                return;
            }
        }
        if let Err(e) = self.publish(store, blob, id, lvol.uuid, name).await {
            tracing::warn!(target: "lvol", "re-listing {name} after a failed delete: {e}");
        }
    }
}
