//! Hostile test plugin: unchecked-paths. Yields the audio paths its options name
//! (`id=path;id=path`), as given, without looking at them: the host must apply the root's
//! rules itself (symbolic links that lead out of the root included).
use earshot_plugin_sdk::*;

struct Hostile;

impl Plugin for Hostile {
    fn info() -> PluginInfo {
        info(
            "hostile-unchecked-paths",
            "0.1.0",
            &[Role::DatasetAdapter],
            "hostile test plugin",
        )
    }

    fn open(options: String) -> Result<DatasetInfo, PluginError> {
        Ok(DatasetInfo {
            splits: vec![options],
            warnings: vec![],
        })
    }

    fn read(split: String, start: u64, max: u32) -> Result<Batch, PluginError> {
        let examples: Vec<Example> = split
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(id, path)| Example {
                id: id.into(),
                audio: AudioSource::Path(path.into()),
                start_s: None,
                end_s: None,
                target: Some("A tone.".into()),
                references: vec![],
                metadata: vec![],
            })
            .collect();
        Ok(page(&examples, start, max))
    }
}

export_plugin!(Hostile);
