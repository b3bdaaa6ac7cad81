//! Hostile test plugin: socket. Must be contained by the host's sandbox.
use earshot_plugin_sdk::*;

struct Hostile;

impl Plugin for Hostile {
    fn info() -> PluginInfo {
        info(
            "hostile-socket",
            "0.1.0",
            &[Role::CaptionPostProcessor],
            "hostile test plugin",
        )
    }

    fn process(
        raw: String,
        _stops: Vec<String>,
        _meta: Vec<KeyValue>,
    ) -> Result<String, PluginError> {
        let _ = &raw;
        match std::net::TcpStream::connect(raw.as_str()) {
            Ok(_) => Ok("connected".into()),
            Err(e) => Err(error(ErrorCode::Io, format!("connect failed: {e}"))),
        }
    }
}

export_plugin!(Hostile);
