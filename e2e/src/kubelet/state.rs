//! The kubelet's own state file, `<state-dir>/nodes/<node>/state.json`: the pod addresses it
//! handed out (so a restarted kubelet never gives one address to two pods) and the pods whose
//! sandboxes it made (so it can remove them after a crash).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeState {
    /// Pod uid -> its address.
    pub addresses: BTreeMap<String, Ipv4Addr>,
    /// The last octet to try first next time.
    pub cursor: u8,
}

pub struct Store {
    path: PathBuf,
    state: Mutex<NodeState>,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("state.json");
        let state = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                NodeState { cursor: 2, ..NodeState::default() }
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Store { path, state: Mutex::new(state) })
    }

    pub fn snapshot(&self) -> NodeState {
        self.state.lock().expect("state lock").clone()
    }

    /// Changes the state and writes it (through a rename, so a crash leaves old or new).
    pub fn update<T>(&self, f: impl FnOnce(&mut NodeState) -> T) -> Result<T> {
        let mut state = self.state.lock().expect("state lock");
        let out = f(&mut state);
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&*state)?)?;
        std::fs::rename(&tmp, &self.path)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.snapshot().cursor, 2);
        store
            .update(|s| {
                s.addresses.insert("uid-1".into(), Ipv4Addr::new(10, 244, 1, 2));
                s.cursor = 3;
            })
            .unwrap();
        let again = Store::open(dir.path()).unwrap();
        assert_eq!(again.snapshot(), store.snapshot());
    }
}
