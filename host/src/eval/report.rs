//! The evaluation report: one self-contained HTML page (no scripts, no external files:
//! styles inline, the loss curve and every clip as data URIs) with the scores, the listening
//! check, the confusion tables and one row per example with its audio, references and
//! caption. Every string in it may come from a plugin or a dataset: all of it is escaped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use base64::Engine as _;

use super::split::{ListeningCheck, MAX_EMBEDDED_AUDIO_BYTES, MAX_EMBEDDED_CLIP_S};
use super::{AttributeScores, Report};

/// What goes into a report besides the scores.
pub struct ReportPage<'a> {
    pub title: String,
    /// Shown as a two-column table under the title (config, checkpoint, split ...).
    pub details: Vec<(String, String)>,
    pub report: &'a Report,
    pub listening: Option<&'a ListeningCheck>,
    /// PNG of the training curves, if the run has them.
    pub loss_curve_png: Option<Vec<u8>>,
    /// Example id -> the 16 kHz mono samples the model heard.
    pub audio: BTreeMap<String, Vec<f32>>,
}

/// Escapes text for HTML element content and attribute values; control characters (other
/// than newline and tab) are shown as U+FFFD.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\n' | '\t' => out.push(c),
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// 16-bit PCM mono WAV of `samples` at 16 kHz, cut to [`MAX_EMBEDDED_CLIP_S`].
pub fn wav_16k(samples: &[f32]) -> Vec<u8> {
    let rate = crate::audio::SAMPLE_RATE;
    let n = samples
        .len()
        .min((MAX_EMBEDDED_CLIP_S * rate as f64) as usize);
    let data = (n * 2) as u32;
    let mut b = Vec::with_capacity(44 + n * 2);
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    for v in [1u16, 1] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for v in [rate, rate * 2] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for v in [2u16, 16] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data.to_le_bytes());
    for &s in &samples[..n] {
        let v = (s.clamp(-1.0, 1.0) * 32767.0).round() as i16;
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

fn data_uri(mime: &str, bytes: &[u8]) -> String {
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:80em}\
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em}\
table{border-collapse:collapse;margin:0.5em 0}\
td,th{border:1px solid #ccc;padding:0.25em 0.6em;text-align:left;vertical-align:top}\
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}\
td.diag{background:#d9f2d9;font-weight:bold}.wrong{color:#b00020}.right{color:#1b7f1b}\
.warning{background:#fff3cd;border:1px solid #e0c060;padding:0.6em}\
.ok{background:#e6f4e6;border:1px solid #8c8;padding:0.6em}\
audio{height:2em;width:16em}img{max-width:100%}";

/// The page as a string.
pub fn render_html(page: &ReportPage) -> String {
    let mut h = String::new();
    let title = escape(&page.title);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{title}</title><style>{STYLE}</style></head><body>\n<h1 id=\"title\">{title}</h1>\n"
    );
    h.push_str("<table id=\"details\">");
    for (k, v) in &page.details {
        let _ = write!(h, "<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v));
    }
    h.push_str("</table>\n");
    summary(&mut h, page);
    scores(&mut h, page.report);
    if let Some(png) = &page.loss_curve_png {
        let _ = write!(
            h,
            "<h2>Training curves</h2>\n<img id=\"loss-curve\" alt=\"training and eval loss by step\" src=\"{}\">\n",
            data_uri("image/png", png)
        );
    }
    for (name, a) in &page.report.attributes {
        confusion(&mut h, name, a);
    }
    examples(&mut h, page);
    h.push_str("</body></html>\n");
    h
}

fn summary(h: &mut String, page: &ReportPage) {
    let r = page.report;
    h.push_str("<h2>Summary</h2>\n<table id=\"summary\">");
    let _ = write!(
        h,
        "<tr><th>examples</th><td class=\"num\">{}</td></tr><tr><th>failed</th><td class=\"num\">{}</td></tr>",
        r.examples, r.failed
    );
    if let Some(loss) = r.eval_loss {
        let _ = write!(
            h,
            "<tr><th>eval loss</th><td class=\"num\">{loss:.4}</td></tr>"
        );
    }
    for (name, a) in &r.attributes {
        let _ = write!(
            h,
            "<tr><th>{} accuracy</th><td class=\"num\">{:.3}</td></tr>",
            escape(name),
            a.accuracy
        );
    }
    h.push_str("</table>\n");
    let Some(c) = page.listening else {
        return;
    };
    h.push_str("<h2>Listening check</h2>\n<table id=\"listening\"><tr><th>audio</th>");
    let _ = write!(h, "<th>{}</th>", escape(&c.primary));
    let attrs: Vec<&String> = r.attributes.keys().collect();
    for a in &attrs {
        let _ = write!(h, "<th>{} accuracy</th>", escape(a));
    }
    h.push_str("<th>CIDEr-D</th><th>eval loss</th></tr>");
    for (label, score, rep) in [
        ("real", c.real_score, r),
        ("silence", c.silence_score, &c.silence),
        ("shuffled", c.shuffled_score, &c.shuffled),
    ] {
        let _ = write!(h, "<tr><td>{label}</td><td class=\"num\">{score:.3}</td>");
        for a in &attrs {
            let acc = rep.attributes.get(*a).map_or(f64::NAN, |s| s.accuracy);
            let _ = write!(h, "<td class=\"num\">{acc:.3}</td>");
        }
        let loss = rep.eval_loss.map_or("-".into(), |l| format!("{l:.4}"));
        let _ = write!(
            h,
            "<td class=\"num\">{:.3}</td><td class=\"num\">{loss}</td></tr>",
            rep.scores.cider_d
        );
    }
    for (label, score) in [
        ("training split's majority", c.majority_score),
        ("uniform chance", c.uniform_score),
    ] {
        if let Some(score) = score {
            let _ = write!(h, "<tr><td>{label}</td><td class=\"num\">{score:.3}</td>");
            for a in &attrs {
                let v = match label {
                    "uniform chance" => c.baselines.uniform.get(*a).copied(),
                    _ => c.baselines.majority.get(*a).map(|m| m.accuracy),
                };
                let v = v.map_or("-".to_string(), |v| format!("{v:.3}"));
                let _ = write!(h, "<td class=\"num\">{v}</td>");
            }
            let cider = match (label, &c.baselines.constant) {
                ("training split's majority", Some(k)) => format!("{:.3}", k.cider_d),
                _ => "-".into(),
            };
            let _ = write!(
                h,
                "<td class=\"num\">{cider}</td><td class=\"num\">-</td></tr>"
            );
        }
    }
    h.push_str("</table>\n");
    let gap = c.real_score - c.best_baseline_score;
    if c.clearly_better {
        let _ = writeln!(
            h,
            "<p id=\"listening-verdict\" class=\"ok\">The model uses the audio: real audio leads \
             the best baseline ({}) by {gap:.3}.</p>",
            escape(&c.best_baseline)
        );
    } else {
        let _ = writeln!(
            h,
            "<p id=\"listening-verdict\" class=\"warning\">Warning: the model does not clearly use \
             the audio (real audio leads the best baseline, {}, by {gap:.3}, less than {}).</p>",
            escape(&c.best_baseline),
            super::split::CLEAR_MARGIN
        );
    }
}

fn scores(h: &mut String, r: &Report) {
    h.push_str(
        "<h2>Caption metrics</h2>\n<table id=\"metrics\"><tr><th>metric</th><th>value</th></tr>",
    );
    for (name, v) in r.scores.named() {
        let _ = write!(h, "<tr><td>{name}</td><td class=\"num\">{v:.4}</td></tr>");
    }
    h.push_str("</table>\n");
}

fn confusion(h: &mut String, name: &str, a: &AttributeScores) {
    let mut columns: Vec<&String> = a.confusion.values().flat_map(|m| m.keys()).collect();
    columns.sort();
    columns.dedup();
    let _ = write!(
        h,
        "<h2>Confusion: {name}</h2>\n<table class=\"confusion\" data-attribute=\"{name}\">\
         <tr><th>expected \\ named</th>",
        name = escape(name)
    );
    for c in &columns {
        let _ = write!(h, "<th>{}</th>", escape(c));
    }
    h.push_str("</tr>");
    for (expected, row) in &a.confusion {
        let _ = write!(h, "<tr><th>{}</th>", escape(expected));
        for c in &columns {
            let n = row.get(*c).copied().unwrap_or(0);
            let class = if *c == expected { "num diag" } else { "num" };
            let _ = write!(h, "<td class=\"{class}\">{n}</td>");
        }
        h.push_str("</tr>");
    }
    h.push_str("</table>\n");
}

fn examples(h: &mut String, page: &ReportPage) {
    let r = page.report;
    let attrs: Vec<&String> = r.attributes.keys().collect();
    h.push_str("<h2>Examples</h2>\n<table id=\"examples\"><tr><th>id</th><th>audio</th>");
    for a in &attrs {
        let _ = write!(h, "<th>{}</th>", escape(a));
    }
    h.push_str("<th>references</th><th>caption</th><th>CIDEr-D</th></tr>\n");
    let mut embedded = 0usize;
    for ex in &r.per_example {
        let _ = write!(h, "<tr class=\"example\"><td>{}</td><td>", escape(&ex.id));
        match page.audio.get(&ex.id) {
            Some(samples) if embedded < MAX_EMBEDDED_AUDIO_BYTES => {
                let wav = wav_16k(samples);
                embedded += wav.len();
                let _ = write!(
                    h,
                    "<audio controls preload=\"none\" src=\"{}\"></audio>",
                    data_uri("audio/wav", &wav)
                );
            }
            _ => h.push_str("(not embedded)"),
        }
        h.push_str("</td>");
        for a in &attrs {
            match ex.attributes.get(*a) {
                Some(res) => {
                    let class = if res.correct { "right" } else { "wrong" };
                    let _ = write!(
                        h,
                        "<td class=\"{class}\">{} &rarr; {}</td>",
                        escape(res.expected.as_deref().unwrap_or("?")),
                        escape(res.found.as_deref().unwrap_or("(none)"))
                    );
                }
                None => h.push_str("<td></td>"),
            }
        }
        let refs: Vec<String> = ex.references.iter().map(|s| escape(s)).collect();
        let _ = writeln!(
            h,
            "<td>{}</td><td class=\"caption\">{}</td><td class=\"num\">{:.3}</td></tr>",
            refs.join("<br>"),
            escape(&ex.caption),
            ex.cider_d
        );
    }
    h.push_str("</table>\n");
}

/// Writes the page to `path` atomically (a temp file beside it, then renamed).
pub fn write_html(path: &Path, page: &ReportPage) -> std::io::Result<()> {
    let html = render_html(page);
    let mut tmp = crate::files::temp_file_for(path)?;
    std::io::Write::write_all(&mut tmp, html.as_bytes())?;
    crate::files::persist(tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_leaves_no_markup() {
        let s = escape("<script>alert('x')</script> & \"q\" \u{1b}[31m");
        assert_eq!(
            s,
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot; \u{FFFD}[31m"
        );
    }

    #[test]
    fn wav_is_cut_and_sized() {
        let samples = vec![0.5f32; 16_000 * 12];
        let w = wav_16k(&samples);
        assert_eq!(w.len(), 44 + 16_000 * 10 * 2);
        assert_eq!(i16::from_le_bytes([w[44], w[45]]), 16384);
    }
}
