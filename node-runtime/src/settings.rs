//! Layered settings, the same for every node: the binary's embedded `default.toml` (every key
//! with its default) → an optional file (`--config` or `EDGESPEC_CONFIG`) → `EDGESPEC__SECTION__KEY`
//! environment variables. Unknown keys are errors (each node's `Settings` denies them); the
//! node validates values itself, before any port is bound.

use std::path::{Path, PathBuf};

use config::{Config, Environment, File, FileFormat};
use serde::de::DeserializeOwned;

/// Prefix of the environment variables that override settings (`EDGESPEC__SECTION__KEY`).
pub const ENV_PREFIX: &str = "EDGESPEC";
/// Separator after the prefix and between section and key.
pub const ENV_SEPARATOR: &str = "__";

/// The `--config` flag every node binary takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArg {
    /// Settings file (TOML) layered over the built-in defaults; EDGESPEC__SECTION__KEY
    /// environment variables override both.
    #[arg(long, env = "EDGESPEC_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Where one node's settings come from, in the order they apply.
#[derive(Debug, Clone, Copy)]
pub struct Sources<'a> {
    /// The embedded base file with every key and its default.
    pub defaults: &'a str,
    /// A TOML file over the defaults (required to exist when given).
    pub file: Option<&'a Path>,
    /// Whether `EDGESPEC__*` environment variables apply last.
    pub env: bool,
    /// Keys whose environment value is a comma-separated list (e.g. `coordinator.addresses`).
    pub env_lists: &'a [&'a str],
}

impl<'a> Sources<'a> {
    /// The defaults, then `file` if any, then the environment: what a node binary loads.
    pub fn node(defaults: &'a str, file: Option<&'a Path>) -> Self {
        Sources {
            defaults,
            file,
            env: true,
            env_lists: &[],
        }
    }

    /// Environment values of these keys are comma-separated lists.
    pub fn with_env_lists(self, keys: &'a [&'a str]) -> Self {
        Sources {
            env_lists: keys,
            ..self
        }
    }
}

/// Settings could not be read or do not fit the node's `Settings` type (the message names the
/// key or the file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SettingsError(pub String);

/// Reads `sources` into `T`.
pub fn load<T: DeserializeOwned>(sources: Sources<'_>) -> Result<T, SettingsError> {
    let mut builder =
        Config::builder().add_source(File::from_str(sources.defaults, FileFormat::Toml));
    if let Some(path) = sources.file {
        builder = builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
    }
    if sources.env {
        let mut env = Environment::with_prefix(ENV_PREFIX)
            .prefix_separator(ENV_SEPARATOR)
            .separator(ENV_SEPARATOR)
            .try_parsing(true);
        if !sources.env_lists.is_empty() {
            env = env.list_separator(",");
            for key in sources.env_lists {
                env = env.with_list_parse_key(key);
            }
        }
        builder = builder.add_source(env);
    }
    builder
        .build()
        .and_then(Config::try_deserialize)
        .map_err(|e| SettingsError(e.to_string()))
}

/// The embedded defaults alone (no file, no environment).
pub fn defaults<T: DeserializeOwned>(defaults: &str) -> Result<T, SettingsError> {
    load(Sources {
        defaults,
        file: None,
        env: false,
        env_lists: &[],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    const DEFAULTS: &str = "[net]\nlisten = \"0.0.0.0:1\"\npeers = []\n[limits]\nmax = 3\n";

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct S {
        net: Net,
        limits: Limits,
    }
    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Net {
        listen: String,
        peers: Vec<String>,
    }
    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Limits {
        max: u32,
    }

    #[test]
    fn a_file_overrides_defaults_and_unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "[limits]\nmax = 7\n").unwrap();
        let s: S = load(Sources {
            env: false,
            ..Sources::node(DEFAULTS, Some(&file))
        })
        .unwrap();
        assert_eq!(s.limits.max, 7);
        assert_eq!(s.net.listen, "0.0.0.0:1");
        std::fs::write(&file, "[limits]\nmaks = 7\n").unwrap();
        let err = load::<S>(Sources::node(DEFAULTS, Some(&file))).unwrap_err();
        assert!(err.0.contains("maks"), "{err}");
        let missing = dir.path().join("missing.toml");
        assert!(load::<S>(Sources::node(DEFAULTS, Some(&missing))).is_err());
        // A file name without the .toml extension is still read as TOML.
        let bare = dir.path().join("node.conf");
        std::fs::write(&bare, "[limits]\nmax = 9\n").unwrap();
        let s: S = load(Sources::node(DEFAULTS, Some(&bare))).unwrap();
        assert_eq!(s.limits.max, 9);
    }

    #[test]
    fn environment_overrides_the_file_and_splits_list_keys() {
        // The only test here that sets EDGESPEC__* variables.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "[limits]\nmax = 7\n").unwrap();
        std::env::set_var("EDGESPEC__LIMITS__MAX", "11");
        std::env::set_var("EDGESPEC__NET__PEERS", "http://a:1,http://b:2");
        let with_lists: Result<S, _> =
            load(Sources::node(DEFAULTS, Some(&file)).with_env_lists(&["net.peers"]));
        let without_env: Result<S, _> = load(Sources {
            env: false,
            ..Sources::node(DEFAULTS, Some(&file))
        });
        std::env::remove_var("EDGESPEC__LIMITS__MAX");
        std::env::remove_var("EDGESPEC__NET__PEERS");
        let s = with_lists.unwrap();
        assert_eq!(s.limits.max, 11);
        assert_eq!(s.net.peers, ["http://a:1", "http://b:2"]);
        assert_eq!(without_env.unwrap().limits.max, 7);
    }
}
