//! Exit statuses, one place (listed in `earshot --help` and the README):
//!
//! | status | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | the command failed (bad input, a failing plugin, a model that does not load ...) |
//! | 2 | usage error: the command line is wrong (unknown flag, missing argument) |
//! | 3 | partial failure: `caption`/`eval` captioned some inputs, others failed; `dataset list` listed some examples, others break a per-example bound (error lines say which); `cache fill` encoded some clips, others failed (warnings say which) |
//! | 4 | integrity failure: `inspect` found damaged weights (non-finite values, a truncated or invalid file) |
//! | 141 | stdout was closed early (`earshot ... \| head`) |

pub const FAILED: u8 = 1;
/// What clap exits with for a bad command line.
pub const USAGE: u8 = 2;
pub const PARTIAL: u8 = 3;
pub const INTEGRITY: u8 = 4;
pub const BROKEN_PIPE: u8 = 141;

/// The text `earshot --help` ends with.
pub const HELP: &str = "Exit status: 0 success; 1 the command failed; 2 usage error (bad command \
line); 3 partial failure (caption: some inputs failed, the others were captioned; dataset list: some \
examples break a bound; cache fill: some clips failed); 4 integrity \
failure (inspect: damaged weights); 141 stdout closed early.";

/// An error that exits with a status other than [`FAILED`].
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    pub code: u8,
    pub message: String,
}

impl Exit {
    pub fn partial(message: String) -> anyhow::Error {
        Self {
            code: PARTIAL,
            message,
        }
        .into()
    }

    pub fn usage(message: String) -> anyhow::Error {
        Self {
            code: USAGE,
            message,
        }
        .into()
    }

    pub fn integrity(message: String) -> anyhow::Error {
        Self {
            code: INTEGRITY,
            message,
        }
        .into()
    }
}

/// The status an error exits with.
pub fn code_of(err: &anyhow::Error) -> u8 {
    if err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    }) {
        return BROKEN_PIPE;
    }
    err.chain()
        .find_map(|e| e.downcast_ref::<Exit>())
        .map_or(FAILED, |e| e.code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_come_from_the_error_chain() {
        assert_eq!(code_of(&anyhow::anyhow!("plain")), FAILED);
        assert_eq!(code_of(&Exit::partial("2 of 3".into())), PARTIAL);
        let wrapped = Exit::integrity("NaN".into()).context("inspecting x");
        assert_eq!(code_of(&wrapped), INTEGRITY);
        let pipe = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert_eq!(code_of(&pipe), BROKEN_PIPE);
    }
}
