//! How a command fails: a configuration or usage mistake (exit status 2) or a failure while it
//! ran (exit status 1).

/// Why a command failed.
pub enum Failure {
    Config(String),
    Runtime(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Runtime(e.into())
    }
}
