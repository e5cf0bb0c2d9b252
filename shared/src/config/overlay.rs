//! Per-service and per-node overlays: the layers between the mesh-wide files and a node's own
//! config. A directory (`gateway.overlays`) holds `services/<service>.toml`, each merged over the
//! service of that name (or making it), and `nodes/<node>.toml`, settings only that node gets
//! (today: `[timeouts]`). The gateway computes each node's effective snapshot from them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::config::{valid_node_name, Config, ConfigError, ServiceConfig, Timeouts};

/// What a node overlay may set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    pub timeouts: Timeouts,
}

/// The `.toml` files of `dir/sub`, sorted; a missing directory has none.
pub fn files(dir: &Path, sub: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir.join(sub))
        .map(|rd| {
            rd.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "toml")).collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn stem(path: &Path) -> Result<String, ConfigError> {
    let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
    // A node's name may have dots; a service's may not, which the service lookup then says.
    if valid_node_name(&name) {
        Ok(name)
    } else {
        Err(ConfigError::Invalid {
            key: "(file name)".into(),
            origin: format!(" in {}", path.display()),
            reason: format!("{name:?} is not a valid service or node name"),
        })
    }
}

fn parse_err(e: figment::Error) -> ConfigError {
    ConfigError::Parse(e.into_iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))
}

/// Merges `services/*.toml` into `config` and validates the result.
pub fn apply_services(config: &mut Config, dir: &Path) -> Result<(), ConfigError> {
    for path in files(dir, "services") {
        let name = stem(&path)?;
        let base = config.service(&name).cloned().unwrap_or_else(|| ServiceConfig::named(name.clone()));
        let merged: ServiceConfig =
            Figment::from(Serialized::defaults(base)).merge(Toml::file_exact(&path)).extract().map_err(parse_err)?;
        if merged.name != name {
            return Err(ConfigError::Invalid {
                key: "name".into(),
                origin: format!(" in {}", path.display()),
                reason: format!("the overlay of service {name:?} cannot rename it"),
            });
        }
        match config.services.iter_mut().find(|s| s.name == name) {
            Some(s) => *s = merged,
            None => config.services.push(merged),
        }
    }
    config.validate()
}

/// Reads `nodes/*.toml` over the mesh-wide settings: node name -> its settings.
pub fn node_settings(config: &Config, dir: &Path) -> Result<BTreeMap<String, NodeSettings>, ConfigError> {
    let mut out = BTreeMap::new();
    for path in files(dir, "nodes") {
        let name = stem(&path)?;
        let base = NodeSettings { timeouts: config.timeouts.clone() };
        let merged: NodeSettings =
            Figment::from(Serialized::defaults(base)).merge(Toml::file_exact(&path)).extract().map_err(parse_err)?;
        let in_file = |e: ConfigError| match e {
            ConfigError::Invalid { key, reason, .. } => {
                ConfigError::Invalid { key, origin: format!(" in {}", path.display()), reason }
            }
            other => other,
        };
        merged.timeouts.validate().map_err(in_file)?;
        out.insert(name, merged);
    }
    Ok(out)
}

/// Loads config files, then the overlays named by `gateway.overlays`, with the same checks the
/// gateway applies on reload (`quicmesh check` uses this too).
pub fn load_with_overlays(files: &[PathBuf]) -> Result<(Config, BTreeMap<String, NodeSettings>), ConfigError> {
    load_layered(files, &[])
}

/// As [`load_with_overlays`], with shared layers over the files.
pub fn load_layered(
    files: &[PathBuf],
    layers: &[crate::config::Layer],
) -> Result<(Config, BTreeMap<String, NodeSettings>), ConfigError> {
    let mut config = crate::config::load_with(files, layers)?;
    let Some(dir) = config.gateway.as_ref().and_then(|g| g.overlays.clone()) else {
        return Ok((config, BTreeMap::new()));
    };
    apply_services(&mut config, &dir)?;
    let nodes = node_settings(&config, &dir)?;
    Ok((config, nodes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_and_node_overlays_layer_over_the_mesh() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("services")).unwrap();
        std::fs::create_dir_all(dir.path().join("nodes")).unwrap();
        std::fs::write(dir.path().join("services/web.toml"), "hosts = [\"web.example\"]\n").unwrap();
        std::fs::write(dir.path().join("services/new.toml"), "protocol = \"h2c\"\n").unwrap();
        std::fs::write(dir.path().join("nodes/node-a.toml"), "[timeouts]\nrequest = \"2s\"\n").unwrap();
        let mut cfg = crate::config::from_toml("[[services]]\nname = \"web\"\n[timeouts]\nconnect = \"3s\"\n").unwrap();
        apply_services(&mut cfg, dir.path()).unwrap();
        assert_eq!(cfg.service("web").unwrap().hosts, ["web.example"]);
        assert_eq!(cfg.service("new").unwrap().protocol, crate::config::Protocol::H2c);
        let nodes = node_settings(&cfg, dir.path()).unwrap();
        let a = &nodes["node-a"].timeouts;
        assert_eq!((a.connect.as_secs(), a.request.as_secs()), (3, 2));
        // Bad overlays are refused, naming the file and key.
        std::fs::write(dir.path().join("nodes/node-b.toml"), "[timeouts]\nrequset = \"2s\"\n").unwrap();
        let err = node_settings(&cfg, dir.path()).unwrap_err().to_string();
        assert!(err.contains("requset") && err.contains("node-b.toml"), "{err}");
        // As in the mesh's own file, no time over 10 years.
        std::fs::write(dir.path().join("nodes/node-b.toml"), "[timeouts]\ntcp_idle = \"11y\"\n").unwrap();
        let err = node_settings(&cfg, dir.path()).unwrap_err().to_string();
        assert!(err.contains("timeouts.tcp_idle") && err.contains("node-b.toml") && err.contains("10 years"), "{err}");
        std::fs::write(dir.path().join("services/web.toml"), "name = \"other\"\n").unwrap();
        assert!(apply_services(&mut cfg, dir.path()).unwrap_err().to_string().contains("rename"));
    }
}
