//! Reading a dataset adapter's split page by page: the one loop training, captioning and
//! `dataset list` share, with the limits each of them needs (a position that must advance,
//! a bound on the examples and pages a split may yield).

use super::roles::DatasetAdapter;
use super::types::{CallFailure, PageExample, PluginError};
use crate::text::display_text;

/// Examples asked for in one `read` when the caller has no reason to choose.
pub const PAGE_SIZE: u32 = 256;

impl DatasetAdapter {
    /// Refuses a split the adapter did not list when it opened, naming the ones it did.
    pub fn require_split(&self, split: &str) -> Result<(), PluginError> {
        if self.dataset.splits.iter().any(|s| s == split) {
            return Ok(());
        }
        Err(PluginError::Call {
            plugin: self.name().to_string(),
            call: "open",
            kind: CallFailure::Reported {
                code: "not found".into(),
                message: format!(
                    "no split {:?} (have: {})",
                    display_text(split, 256),
                    self.dataset.splits.join(", ")
                ),
            },
        })
    }

    /// The pages of `split`, from its start, `page_size` examples at most each.
    pub fn pages(&mut self, split: &str, page_size: u32) -> SplitPages<'_> {
        let max_examples = self.max_examples();
        SplitPages {
            adapter: self,
            split: split.to_string(),
            position: Some(0),
            page_size: page_size.max(1),
            examples: 0,
            pages: 0,
            max_examples,
        }
    }
}

/// A split being read; see [`DatasetAdapter::pages`].
pub struct SplitPages<'a> {
    adapter: &'a mut DatasetAdapter,
    split: String,
    /// Where the next page starts; None after the last.
    position: Option<u64>,
    page_size: u32,
    examples: u64,
    pages: u64,
    max_examples: u64,
}

impl SplitPages<'_> {
    /// The next page's examples (its warnings go to the log), or None after the last page.
    /// An example that breaks a per-example bound comes back as its own `Err`, the others of
    /// its page as usual; a page that breaks the read contract as a whole (more examples than
    /// asked for, a position that does not advance, more bytes than the call may return) is
    /// the error of the call. A split that yields more than `plugins.sandbox.max-examples`
    /// examples, or as many pages (empty pages that only move the position), is an error
    /// naming the plugin.
    pub fn next_page(&mut self) -> Result<Option<Vec<PageExample>>, PluginError> {
        self.next_page_of(self.page_size)
    }

    /// As [`Self::next_page`], asking for at most `max` examples.
    pub fn next_page_of(&mut self, max: u32) -> Result<Option<Vec<PageExample>>, PluginError> {
        let Some(start) = self.position else {
            return Ok(None);
        };
        let batch = self.adapter.read(&self.split, start, max.max(1))?;
        for w in &batch.warnings {
            tracing::warn!("dataset: {w}");
        }
        self.examples += batch.examples.len() as u64;
        self.pages += 1;
        if self.examples > self.max_examples || self.pages > self.max_examples {
            return Err(PluginError::Call {
                plugin: self.adapter.name().to_string(),
                call: "read",
                kind: CallFailure::BadOutput(format!(
                    "split {} goes on past {} examples in {} pages (position {start}); raise \
                     plugins.sandbox.max-examples if the dataset is really this large",
                    display_text(&self.split, 256),
                    self.max_examples,
                    self.pages
                )),
            });
        }
        self.position = batch.next;
        Ok(Some(batch.examples))
    }
}
