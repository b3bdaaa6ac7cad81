//! Hostile test plugin: terminal-escapes. Says things that drive a terminal: clear the screen, set the window title, write the
//! clipboard (OSC 52), a C1 control sequence introducer, a bidi override, and a forged
//! line of `plugin check` output.
use earshot_plugin_sdk::*;

struct Hostile;

const ROLES: &[Role] = &[Role::DatasetAdapter, Role::CaptionPostProcessor];

const NASTY: &str = "\u{1b}[2J\u{1b}]0;pwned\u{7}\u{1b}]52;c;cHduZWQ=\u{7}\u{9b}31m\u{202e}txt.exe\nroles: dataset-adapter";

impl Plugin for Hostile {
    fn info() -> PluginInfo {
        let mut i = info("hostile-terminal-escapes", "0.1.0", ROLES, NASTY);
        i.name = format!("hostile-terminal-escapes{NASTY}");
        i
    }

    fn open(_options: String) -> Result<DatasetInfo, PluginError> {
        Ok(DatasetInfo {
            splits: vec!["train".into()],
            warnings: vec![format!("warning{NASTY}")],
        })
    }

    fn read(_split: String, _start: u64, _max: u32) -> Result<Batch, PluginError> {
        Err(error(ErrorCode::Io, format!("message{NASTY}")))
    }

    fn process(_raw: String, _s: Vec<String>, _m: Vec<KeyValue>) -> Result<String, PluginError> {
        Ok(format!("caption{NASTY}"))
    }
}

export_plugin!(Hostile);
