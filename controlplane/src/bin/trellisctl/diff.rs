//! A small line diff for `trellisctl diff`: longest common subsequence over
//! lines, rendered as a unified diff (`@@ -a,b +c,d @@` hunks with three
//! lines of context).
//!
//! The common head and tail are stripped first; the LCS table covers only
//! the lines in between. Should that still be huge (documents are at most
//! 256 KiB, so thousands of lines), the middle is shown as removed and
//! added as a whole: still a correct diff, just not a minimal one.

/// Lines of context around each change.
pub const CONTEXT: usize = 3;

/// Largest LCS table (cells) computed; beyond it the middle is replaced
/// wholesale.
const MAX_TABLE_CELLS: usize = 4_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op<'a> {
    Same(&'a str),
    Removed(&'a str),
    Added(&'a str),
}

/// The edit script turning `old` into `new`.
fn edits<'a>(old: &[&'a str], new: &[&'a str]) -> Vec<Op<'a>> {
    let head = old.iter().zip(new).take_while(|(a, b)| a == b).count();
    let tail = old[head..]
        .iter()
        .rev()
        .zip(new[head..].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let a = &old[head..old.len() - tail];
    let b = &new[head..new.len() - tail];
    let mut ops: Vec<Op<'a>> = old[..head].iter().map(|l| Op::Same(l)).collect();
    let cells = (a.len() + 1).saturating_mul(b.len() + 1);
    if a.is_empty() || b.is_empty() || cells > MAX_TABLE_CELLS {
        ops.extend(a.iter().map(|l| Op::Removed(l)));
        ops.extend(b.iter().map(|l| Op::Added(l)));
    } else {
        // lcs[i][j]: length of the LCS of a[i..] and b[j..].
        let width = b.len() + 1;
        let mut lcs = vec![0u32; (a.len() + 1) * width];
        for i in (0..a.len()).rev() {
            for j in (0..b.len()).rev() {
                lcs[i * width + j] = if a[i] == b[j] {
                    lcs[(i + 1) * width + j + 1] + 1
                } else {
                    lcs[(i + 1) * width + j].max(lcs[i * width + j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < a.len() && j < b.len() {
            if a[i] == b[j] {
                ops.push(Op::Same(a[i]));
                i += 1;
                j += 1;
            } else if lcs[(i + 1) * width + j] >= lcs[i * width + j + 1] {
                ops.push(Op::Removed(a[i]));
                i += 1;
            } else {
                ops.push(Op::Added(b[j]));
                j += 1;
            }
        }
        ops.extend(a[i..].iter().map(|l| Op::Removed(l)));
        ops.extend(b[j..].iter().map(|l| Op::Added(l)));
    }
    ops.extend(old[old.len() - tail..].iter().map(|l| Op::Same(l)));
    ops
}

/// The hunks of a unified diff from `old` to `new` (no `---`/`+++`
/// header); empty when the texts have the same lines.
pub fn unified(old: &str, new: &str) -> String {
    let old_lines: Vec<&str> = old.lines().collect();
    let new_lines: Vec<&str> = new.lines().collect();
    let ops = edits(&old_lines, &new_lines);
    let changed: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, op)| !matches!(op, Op::Same(_)))
        .map(|(i, _)| i)
        .collect();
    let mut out = String::new();
    let Some(&first) = changed.first() else {
        return out;
    };
    // Group changes whose context windows touch into hunks [start, end).
    let mut hunks: Vec<(usize, usize)> = Vec::new();
    let mut start = first.saturating_sub(CONTEXT);
    let mut end = (first + 1 + CONTEXT).min(ops.len());
    for &i in &changed[1..] {
        if i.saturating_sub(CONTEXT) <= end {
            end = (i + 1 + CONTEXT).min(ops.len());
        } else {
            hunks.push((start, end));
            start = i.saturating_sub(CONTEXT);
            end = (i + 1 + CONTEXT).min(ops.len());
        }
    }
    hunks.push((start, end));

    // Line numbers (0-based) in old and new at each op.
    let mut old_at = Vec::with_capacity(ops.len() + 1);
    let mut new_at = Vec::with_capacity(ops.len() + 1);
    let (mut o, mut n) = (0usize, 0usize);
    for op in &ops {
        old_at.push(o);
        new_at.push(n);
        match op {
            Op::Same(_) => {
                o += 1;
                n += 1;
            }
            Op::Removed(_) => o += 1,
            Op::Added(_) => n += 1,
        }
    }
    old_at.push(o);
    new_at.push(n);

    for (start, end) in hunks {
        let old_count = old_at[end] - old_at[start];
        let new_count = new_at[end] - new_at[start];
        out.push_str(&format!(
            "@@ -{} +{} @@\n",
            range(old_at[start], old_count),
            range(new_at[start], new_count)
        ));
        for op in &ops[start..end] {
            let (mark, line) = match op {
                Op::Same(l) => (' ', l),
                Op::Removed(l) => ('-', l),
                Op::Added(l) => ('+', l),
            };
            out.push(mark);
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// `start,count` as unified diffs write it: 1-based, and an empty range
/// names the line before it.
fn range(start0: usize, count: usize) -> String {
    if count == 0 {
        format!("{start0},0")
    } else {
        format!("{},{count}", start0 + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_texts_have_no_hunks() {
        assert_eq!(unified("a\nb\n", "a\nb\n"), "");
        assert_eq!(unified("", ""), "");
    }

    #[test]
    fn creation_is_all_added() {
        assert_eq!(unified("", "a\nb\n"), "@@ -0,0 +1,2 @@\n+a\n+b\n");
    }

    #[test]
    fn one_changed_line_with_context() {
        let old = "1\n2\n3\n4\n5\n6\n7\n8\n9\n";
        let new = "1\n2\n3\n4\nfive\n6\n7\n8\n9\n";
        assert_eq!(
            unified(old, new),
            "@@ -2,7 +2,7 @@\n 2\n 3\n 4\n-5\n+five\n 6\n 7\n 8\n"
        );
    }

    #[test]
    fn distant_changes_make_separate_hunks() {
        let old: String = (1..=20).map(|i| format!("{i}\n")).collect();
        let new: String = (1..=20)
            .map(|i| match i {
                2 => "two\n".to_string(),
                19 => "nineteen\n".to_string(),
                i => format!("{i}\n"),
            })
            .collect();
        let diff = unified(&old, &new);
        assert_eq!(diff.matches("@@ -").count(), 2, "{diff}");
        assert!(diff.contains("-2\n+two\n"), "{diff}");
        assert!(diff.contains("-19\n+nineteen\n"), "{diff}");
        assert!(diff.starts_with("@@ -1,5 +1,5 @@\n"), "{diff}");
    }

    #[test]
    fn insertions_and_removals_are_minimal() {
        let diff = unified("a\nb\nc\n", "a\nx\nb\nc\nd\n");
        assert_eq!(diff, "@@ -1,3 +1,5 @@\n a\n+x\n b\n c\n+d\n");
        let diff = unified("a\nb\nc\n", "c\n");
        assert_eq!(diff, "@@ -1,3 +1,1 @@\n-a\n-b\n c\n");
    }

    #[test]
    fn lcs_in_the_middle() {
        let ops = edits(&["a", "b", "c", "d"], &["a", "c", "b", "d"]);
        let same = ops.iter().filter(|o| matches!(o, Op::Same(_))).count();
        assert_eq!(same, 3, "{ops:?}");
    }
}
