//! `ringraft-bench compare a.json b.json`: every number the two results share, side by side.

use serde_json::Value;

/// One compared number.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Dotted path, e.g. `cluster.ops_per_s`.
    pub key: String,
    pub a: String,
    pub b: String,
    /// b / a, when a is not zero.
    pub ratio: Option<f64>,
}

fn leaves(prefix: &str, value: &Value, out: &mut Vec<(String, f64)>) {
    match value {
        Value::Number(n) => {
            if let Some(v) = n.as_f64() {
                out.push((prefix.to_string(), v));
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(&key, v, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                leaves(&format!("{prefix}[{i}]"), v, out);
            }
        }
        _ => {}
    }
}

fn shown(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// The numbers both results have (the machine's date is left out: it always differs).
pub fn rows(a: &Value, b: &Value) -> Vec<Row> {
    let (mut la, mut lb) = (Vec::new(), Vec::new());
    leaves("", a, &mut la);
    leaves("", b, &mut lb);
    let lb: std::collections::BTreeMap<String, f64> = lb.into_iter().collect();
    la.into_iter()
        .filter(|(k, _)| k != "machine.date_unix_s")
        .filter_map(|(key, va)| {
            let vb = *lb.get(&key)?;
            Some(Row {
                ratio: (va != 0.0).then(|| vb / va),
                a: shown(va),
                b: shown(vb),
                key,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shared_numbers_with_ratios() {
        let a = json!({"machine": {"date_unix_s": 1, "cpus_online": 2}, "cluster": {"ops_per_s": 100.0, "transport": "tcp", "node_cpu_percent": [50.0]}});
        let b = json!({"machine": {"date_unix_s": 2, "cpus_online": 2}, "cluster": {"ops_per_s": 250.0, "errors": 3, "node_cpu_percent": [25.0]}});
        let rows = rows(&a, &b);
        let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "cluster.node_cpu_percent[0]",
                "cluster.ops_per_s",
                "machine.cpus_online"
            ]
        );
        assert_eq!(rows[1].ratio, Some(2.5));
        assert_eq!((rows[1].a.as_str(), rows[1].b.as_str()), ("100", "250"));
        assert_eq!(rows[0].ratio, Some(0.5));
    }
}
