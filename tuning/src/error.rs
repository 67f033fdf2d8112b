//! Configuration and start-up errors: each names the key (or limit) at fault and how to fix it.

use std::fmt;

/// One problem with the configuration or the machine's limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The config key at fault (`wal.segment_bytes`), or the limit (`RLIMIT_MEMLOCK`).
    pub key: String,
    pub problem: String,
    pub fix: String,
    /// Where in which file, for parse errors.
    pub location: Option<String>,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) -> ConfigError {
        ConfigError {
            key: key.into(),
            problem: problem.into(),
            fix: fix.into(),
            location: None,
        }
    }

    pub(crate) fn parse(message: &str, line: Option<usize>) -> ConfigError {
        // toml names the offending key in its message ("unknown field `segmnt_bytes`").
        let key = message
            .split('`')
            .nth(1)
            .filter(|_| message.contains("unknown field") || message.contains("missing field"))
            .unwrap_or("(syntax)")
            .to_string();
        ConfigError {
            key,
            problem: message.trim().to_string(),
            fix: "see docs/config.md for every key and its type".into(),
            location: line.map(|l| format!("line {l}")),
        }
    }

    pub(crate) fn in_file(mut self, path: &std::path::Path) -> ConfigError {
        self.location = Some(match self.location {
            Some(at) => format!("{}, {at}", path.display()),
            None => path.display().to_string(),
        });
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config `{}`: {}", self.key, self.problem)?;
        if let Some(location) = &self.location {
            write!(f, " ({location})")?;
        }
        write!(f, ". Fix: {}", self.fix)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem validation found, so an operator fixes them in one pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// Whether some error names `key`.
    pub fn names(&self, key: &str) -> bool {
        self.0.iter().any(|e| e.key == key)
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} problem(s) in the configuration:", self.0.len())?;
        for error in &self.0 {
            writeln!(f, "  - {error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
