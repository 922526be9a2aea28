//! Policy errors: each names the file, the line and column, and the problem.

use std::{fmt, path::PathBuf};

/// One problem in one policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    /// 1-based line and column; 0 when the problem is the file as a whole.
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// Every problem found in a policy set. Validation never stops at the first.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl PolicyErrors {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// 1-based (line, column) of a byte offset in `text`.
pub fn position(text: &str, offset: usize) -> (usize, usize) {
    Positions::new(text).at(offset)
}

/// Turns byte offsets in a file into 1-based line/column positions.
pub(crate) struct Positions<'a> {
    text: &'a str,
}

impl<'a> Positions<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        Self { text }
    }

    pub(crate) fn at(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        let column = before.rfind('\n').map_or(before.chars().count(), |nl| {
            before[nl + 1..].chars().count()
        }) + 1;
        (line, column)
    }
}

#[cfg(test)]
mod tests {
    use super::Positions;

    #[test]
    fn positions_are_one_based() {
        let p = Positions::new("a = 1\nbb = 2\n");
        assert_eq!(p.at(0), (1, 1));
        assert_eq!(p.at(6), (2, 1));
        assert_eq!(p.at(8), (2, 3));
    }
}
