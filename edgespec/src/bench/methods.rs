//! Drafting methods compared (`--draft-methods`, issue 17): what scenarios (a) and (d) report
//! when they measure `model` / `lookup` / `hybrid` against target-only — every ratio also per
//! prompt kind, since prompt lookup only pays where the answer repeats its input (`grounded`).

use super::inproc::{GROUNDED, OTHERS};
use super::report::{Column, ConfigResult, SummaryLine};
use super::{ratio, set_tokens_per_s_ratio, Prompt};

/// The issue's goal for `hybrid` on input-grounded prompts (× target-only, one shared CPU).
pub(super) const HYBRID_GROUNDED_TARGET: f64 = 1.3;
/// The issue's floor for `hybrid` on every other kind (the γ controller switches it off there).
pub(super) const HYBRID_OTHERS_FLOOR: f64 = 0.95;

/// The prompt groups of the per-kind columns: `grounded` first, then `others` (every other
/// kind together) when both exist, then each other kind in order of appearance.
pub(super) fn kinds(prompts: &[Prompt]) -> Vec<String> {
    let mut kinds: Vec<String> = Vec::new();
    for p in prompts {
        if !kinds.contains(&p.kind) {
            kinds.push(p.kind.clone());
        }
    }
    if let Some(i) = kinds.iter().position(|k| k == GROUNDED) {
        let g = kinds.remove(i);
        kinds.insert(0, g);
        if kinds.len() > 1 {
            kinds.insert(1, OTHERS.into());
        }
    }
    kinds
}

/// Sets every configuration's ratios against the first one (target-only), overall and per
/// group of `kinds`, and returns the headline lines (targets on `hybrid` only: the issue's).
pub(super) fn compare(
    configs: &mut [ConfigResult],
    kinds: &[String],
    series_prefix: &str,
) -> Vec<SummaryLine> {
    let Some(base) = configs.first().cloned() else {
        return Vec::new();
    };
    let mut summary = Vec::new();
    for c in configs.iter_mut() {
        set_tokens_per_s_ratio(c, &base, "target_only");
        for k in kinds {
            let key = format!("tokens_per_s_{k}");
            if let Some(v) = ratio(c.median.get(&key).copied(), base.median.get(&key).copied()) {
                c.ratios.insert(format!("{key}_vs_target_only"), v);
            }
        }
        let Some(method) = c.params["draft_method"].as_str().map(str::to_string) else {
            continue;
        };
        if c.params["speculation"] == false || c.params["speculation_off"] == true {
            continue;
        }
        let hybrid = method == "hybrid";
        let at = if c.x > 0.0 {
            format!(" at RTT {} ms", c.x)
        } else {
            String::new()
        };
        let vs = |k: &str| {
            c.ratios
                .get(&format!("tokens_per_s_{k}_vs_target_only"))
                .copied()
        };
        summary.push(SummaryLine::ratio(
            format!("{series_prefix} {method}{at} / target-only, all prompts"),
            c.ratios.get("tokens_per_s_vs_target_only").copied(),
            None,
        ));
        if kinds.iter().any(|k| k == GROUNDED) {
            summary.push(SummaryLine::ratio(
                format!("{series_prefix} {method}{at} / target-only, grounded prompts"),
                vs(GROUNDED),
                hybrid.then_some(HYBRID_GROUNDED_TARGET),
            ));
        }
        let worst = kinds
            .iter()
            .filter(|k| *k != GROUNDED && *k != OTHERS)
            .filter_map(|k| vs(k).map(|v| (k, v)))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((k, v)) = worst {
            summary.push(SummaryLine::ratio(
                format!("{series_prefix} {method}{at} / target-only, worst other kind ({k})"),
                Some(v),
                hybrid.then_some(HYBRID_OTHERS_FLOOR),
            ));
        }
    }
    summary
}

/// The table: overall tokens/s and ratio, the ratio per group, target forwards per committed
/// token and acceptance for grounded and the rest (or per kind without grounded prompts).
pub(super) fn columns(kinds: &[String]) -> Vec<Column> {
    let mut c = vec![
        Column::new("tokens_per_s", "tok/s", 2),
        Column::new("ratio:tokens_per_s_vs_target_only", "× target-only", 2),
    ];
    for k in kinds {
        c.push(Column::new(
            &format!("ratio:tokens_per_s_{k}_vs_target_only"),
            &format!("× t-o {k}"),
            2,
        ));
    }
    let detail: Vec<&String> = if kinds.iter().any(|k| k == OTHERS) {
        kinds.iter().take(2).collect()
    } else {
        kinds.iter().collect()
    };
    for k in &detail {
        c.push(Column::new(
            &format!("forwards_per_token_{k}"),
            &format!("fwd/tok {k}"),
            3,
        ));
    }
    for k in &detail {
        c.push(Column::new(
            &format!("acceptance_{k}"),
            &format!("acc {k}"),
            2,
        ));
    }
    c.push(Column::new("gamma_mean", "γ mean", 2));
    c.push(Column::new("text_mismatches", "text ≠ ref", 0));
    c
}

/// The notes under a methods table.
pub(super) fn notes(setup: &str) -> Vec<String> {
    vec![
        setup.to_string(),
        "Every method runs with the adaptive γ controller; `× t-o <kind>` is the median tokens/s of that kind's prompts over the median of target-only on the same prompts (same invocation); `others` is every kind but grounded together.".into(),
        "fwd/tok = target forwards (verification rounds) per committed token; acceptance = accepted / drafted tokens. A lookup block costs no draft compute, so its acceptance can be low and still pay.".into(),
        "text ≠ ref counts answers that differ from target-only's (greedy decoding is lossless, so a difference is a numeric near-tie between batched and single-token forwards).".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn prompt(kind: &str) -> Prompt {
        Prompt {
            id: kind.into(),
            kind: kind.into(),
            prompt: String::new(),
        }
    }

    fn config(method: Option<&str>, tps: &[(&str, f64)]) -> ConfigResult {
        ConfigResult {
            name: method.unwrap_or("target-only").into(),
            series: method.unwrap_or("target-only").into(),
            x: 0.0,
            params: serde_json::json!({
                "draft_method": method.unwrap_or("model"),
                "speculation_off": method.is_none(),
            }),
            runs: Vec::new(),
            median: tps.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ratios: BTreeMap::new(),
        }
    }

    #[test]
    fn kinds_put_grounded_and_the_rest_first() {
        let ps = [prompt("code"), prompt("grounded"), prompt("prose")];
        assert_eq!(kinds(&ps), ["grounded", "others", "code", "prose"]);
        assert_eq!(kinds(&ps[..1]), ["code"]);
        assert_eq!(kinds(&ps[1..2]), ["grounded"]);
    }

    #[test]
    fn hybrid_is_held_to_the_issue_targets_per_kind() {
        let kinds = vec![
            "grounded".into(),
            "others".into(),
            "code".into(),
            "prose".into(),
        ];
        let mut configs = vec![
            config(
                None,
                &[
                    ("tokens_per_s", 10.0),
                    ("tokens_per_s_grounded", 10.0),
                    ("tokens_per_s_code", 10.0),
                    ("tokens_per_s_prose", 10.0),
                ],
            ),
            config(
                Some("hybrid"),
                &[
                    ("tokens_per_s", 12.0),
                    ("tokens_per_s_grounded", 14.0),
                    ("tokens_per_s_code", 11.0),
                    ("tokens_per_s_prose", 9.0),
                ],
            ),
        ];
        let summary = compare(&mut configs, &kinds, "adaptive");
        let h = &configs[1].ratios;
        assert!((h["tokens_per_s_grounded_vs_target_only"] - 1.4).abs() < 1e-9);
        let grounded = summary
            .iter()
            .find(|l| l.what.contains("grounded"))
            .unwrap();
        assert_eq!(grounded.pass, Some(true));
        let worst = summary.iter().find(|l| l.what.contains("worst")).unwrap();
        assert!(worst.what.contains("prose"), "{}", worst.what);
        assert_eq!(worst.pass, Some(false), "0.9 is below the 0.95 floor");
        // Target-only itself gets no headline, and the columns name every group.
        assert!(summary.iter().all(|l| l.what.contains("hybrid")));
        let cols = columns(&kinds);
        assert!(cols
            .iter()
            .any(|c| c.key == "ratio:tokens_per_s_prose_vs_target_only"));
        assert!(cols.iter().any(|c| c.key == "forwards_per_token_others"));
    }
}
