//! Aligned text tables for people.

/// A table: a header row and rows of cells, printed with columns padded to
/// their widest cell.
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

/// `s` on one line, without what a terminal would take as a command: every
/// control character (a line break in an error message, an escape sequence
/// in a file name) becomes a space.
pub fn one_line(s: &str) -> String {
    s.chars()
        .map(|ch| if ch.is_control() { ' ' } else { ch })
        .collect()
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Self {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; a line break or other control character in a cell (an
    /// error message from the agent, say) becomes a space, so that every
    /// row stays one line.
    pub fn row(&mut self, mut cells: Vec<String>) {
        for c in cells.iter_mut().filter(|c| c.chars().any(char::is_control)) {
            *c = one_line(c);
        }
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let line = |f: &mut std::fmt::Formatter<'_>, cells: &[String]| -> std::fmt::Result {
            let mut s = String::new();
            for (i, w) in widths.iter().enumerate() {
                let c = cells.get(i).map(String::as_str).unwrap_or("");
                if i + 1 == n {
                    s.push_str(c);
                } else {
                    s.push_str(c);
                    s.extend(std::iter::repeat_n(' ', w - c.chars().count() + 2));
                }
            }
            writeln!(f, "{}", s.trim_end())
        };
        line(f, &self.headers)?;
        for r in &self.rows {
            line(f, r)?;
        }
        Ok(())
    }
}

/// `-` for absent values.
pub fn or_dash(v: Option<impl ToString>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_with_a_line_break_stays_on_its_row() {
        let mut t = Table::new(&["NAME", "PROBLEM"]);
        t.row(vec!["ca".into(), "signing failed:\nkey rejected\r".into()]);
        t.row(vec!["b".into(), "-".into()]);
        assert_eq!(
            t.to_string(),
            "NAME  PROBLEM\nca    signing failed: key rejected\nb     -\n"
        );
    }

    #[test]
    fn columns_are_aligned() {
        let mut t = Table::new(&["NAME", "MODE"]);
        t.row(vec!["a-long-name".into(), "STRICT".into()]);
        t.row(vec!["b".into(), "-".into()]);
        assert_eq!(
            t.to_string(),
            "NAME         MODE\na-long-name  STRICT\nb            -\n"
        );
    }
}
