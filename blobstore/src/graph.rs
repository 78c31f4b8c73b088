//! The blob graph: the open blobs, the snapshot -> clones and clone -> parent relations,
//! and the busy marks of running operations, behind their own lock (a std mutex never
//! held across an await).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::blob::BlobInner;
use crate::store::StoreInner;
use crate::{BlobId, Result};

/// What the graph tracks.
#[derive(Default)]
pub(crate) struct GraphState {
    pub open: HashMap<BlobId, Arc<BlobInner>>,
    /// Snapshot -> its clones, in creation / load order.
    pub clones: BTreeMap<BlobId, Vec<BlobId>>,
    /// Clone -> its snapshot parent.
    pub parent_of: HashMap<BlobId, BlobId>,
    pub busy: HashSet<BlobId>,
}

/// The graph behind its own lock.
#[derive(Default)]
pub(crate) struct Graph {
    st: Mutex<GraphState>,
}

impl Graph {
    /// The graph's state (never held across an await).
    pub(crate) fn lock(&self) -> MutexGuard<'_, GraphState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Releases the busy marks of an operation when dropped.
pub(crate) struct BusyGuard {
    bs: Arc<StoreInner>,
    ids: Vec<BlobId>,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut st = self.bs.graph.lock();
        for id in &self.ids {
            st.busy.remove(id);
        }
    }
}

impl StoreInner {
    /// Ids of the clones of `id` (empty when it has none).
    pub(crate) fn clones_of(&self, id: BlobId) -> Vec<BlobId> {
        self.graph
            .lock()
            .clones
            .get(&id)
            .cloned()
            .unwrap_or_default()
    }

    pub(crate) fn busy_guard(self: &Arc<Self>, ids: &[BlobId]) -> Result<BusyGuard> {
        let mut st = self.graph.lock();
        if let Some(id) = ids.iter().find(|id| st.busy.contains(id)) {
            return Err(crate::error::busy(format!(
                "another operation is in progress on blob {id:#x}"
            )));
        }
        for id in ids {
            st.busy.insert(*id);
        }
        Ok(BusyGuard {
            bs: self.clone(),
            ids: ids.to_vec(),
        })
    }

    pub(crate) fn add_relation(&self, snap: BlobId, clone: BlobId) {
        let mut st = self.graph.lock();
        st.parent_of.insert(clone, snap);
        let v = st.clones.entry(snap).or_default();
        if !v.contains(&clone) {
            v.push(clone);
        }
    }

    /// Drops every relation of a deleted blob.
    pub(crate) fn forget_blob(&self, id: BlobId) {
        self.remove_relation(id);
        self.graph.lock().clones.remove(&id);
    }

    pub(crate) fn remove_relation(&self, clone: BlobId) {
        let mut st = self.graph.lock();
        if let Some(p) = st.parent_of.remove(&clone) {
            // Like SPDK, a snapshot keeps its (maybe empty) entry until it is deleted, so it
            // still counts as a snapshot for set_parent.
            if let Some(v) = st.clones.get_mut(&p) {
                v.retain(|&c| c != clone);
            }
        }
    }
}
