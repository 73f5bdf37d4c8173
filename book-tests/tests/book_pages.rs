//! Guards that keep the doctest crate covering the whole book: a new page is
//! wired into `src/lib.rs`, and no Rust block slips back to `ignore` unless
//! rustdoc cannot compile it (an mdBook `{{#include}}` of an example).

use std::fs;
use std::path::{Path, PathBuf};

/// `book/src`, from this crate's directory.
fn book_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../book/src")
}

/// Every `.md` file under `dir`, as paths relative to `book/src` with `/`.
fn pages(dir: &Path, out: &mut Vec<String>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .expect("book/src is readable")
        .map(|entry| entry.expect("directory entry is readable").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            pages(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "md") {
            let relative = path.strip_prefix(book_src()).expect("under book/src");
            out.push(relative.to_string_lossy().replace('\\', "/"));
        }
    }
}

/// All pages of the book; `SUMMARY.md` is the table of contents, not a page.
fn book_pages() -> Vec<String> {
    let mut out = Vec::new();
    pages(&book_src(), &mut out);
    out.retain(|page| page != "SUMMARY.md");
    out
}

/// One fenced block: the info string after the opening fence, its body lines,
/// and the line number of the fence.
struct Block {
    info: String,
    body: Vec<String>,
    line: usize,
}

/// The fenced blocks of a page (fences of three backticks, as the book uses).
fn blocks(text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<Block> = None;
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        match (&mut open, trimmed.strip_prefix("```")) {
            (None, Some(info)) => {
                open = Some(Block {
                    info: info.trim().to_owned(),
                    body: Vec::new(),
                    line: index + 1,
                })
            }
            (Some(_), Some(_)) => out.extend(open.take()),
            (Some(block), None) => block.body.push(line.to_owned()),
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "a fence is never closed");
    out
}

#[test]
fn every_book_page_is_a_doctest_module() {
    let lib = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .expect("src/lib.rs is readable");
    let pages = book_pages();
    assert!(pages.contains(&"reference/rpc.md".to_owned()), "{pages:?}");
    for page in pages {
        let include = format!("include_str!(\"../../book/src/{page}\")");
        assert!(
            lib.contains(&include),
            "book/src/{page} is not included by book-tests/src/lib.rs: add \
             `#[doc = {include}] mod <name> {{}}`"
        );
    }
}

#[test]
fn rust_blocks_are_ignored_only_for_mdbook_includes() {
    for page in book_pages() {
        let text = fs::read_to_string(book_src().join(&page)).expect("page is readable");
        for block in blocks(&text) {
            let tags: Vec<&str> = block.info.split(',').map(str::trim).collect();
            if tags.first() != Some(&"rust") || !tags.contains(&"ignore") {
                continue;
            }
            let only_includes = block
                .body
                .iter()
                .all(|line| line.trim().starts_with("{{#include") || line.trim().is_empty());
            assert!(
                only_includes,
                "book/src/{page}:{}: a `rust,ignore` block that is not an mdBook include; \
                 make it compile (hidden `# ` setup lines) or `compile_fail`",
                block.line
            );
        }
    }
}

#[test]
fn every_fence_names_its_language() {
    // rustdoc tests an unmarked fence as Rust; a shell or text block must say so.
    for page in book_pages() {
        let text = fs::read_to_string(book_src().join(&page)).expect("page is readable");
        for block in blocks(&text) {
            assert!(
                !block.info.is_empty(),
                "book/src/{page}:{}: a fence without a language; write ```text, ```sh or ```rust",
                block.line
            );
        }
    }
}
