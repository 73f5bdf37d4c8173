//! Expansion snapshots (prettyplease + expect-test) and the errors of
//! `#[entity]`, checked without a compiler. Update the snapshots with
//! `UPDATE_EXPECT=1 cargo test -p flotilla-macros`.

use expect_test::{ExpectFile, expect_file};
use proc_macro2::TokenStream;
use quote::quote;
use syn::{Item, Lit};

fn pretty(tokens: TokenStream) -> String {
    let file: syn::File = syn::parse2(tokens).expect("the expansion parses as a file");
    prettyplease::unparse(&file)
}

fn check(attr: TokenStream, item: TokenStream, expected: ExpectFile) {
    let input = pretty(item.clone());
    let output = pretty(super::expand(attr.clone(), item));
    let header = format!("// #[entity({attr})]\n// ---- input ----\n");
    let input = input
        .lines()
        .map(|line| format!("// {line}").trim_end().to_owned())
        .collect::<Vec<_>>()
        .join("\n");
    expected.assert_eq(&format!(
        "{header}{input}\n// ---- expansion ----\n{output}"
    ));
}

/// The expansion's `compile_error!` messages, and the items it kept.
fn errors(attr: TokenStream, item: TokenStream) -> (Vec<String>, Vec<Item>) {
    let file: syn::File = syn::parse2(super::expand(attr, item)).expect("output parses");
    let mut messages = Vec::new();
    let mut items = Vec::new();
    for item in file.items {
        match &item {
            Item::Macro(mac) if mac.mac.path.segments.last().unwrap().ident == "compile_error" => {
                let lit: Lit = mac.mac.parse_body().unwrap();
                let Lit::Str(lit) = lit else {
                    panic!("message is a string")
                };
                messages.push(lit.value());
            }
            _ => items.push(item),
        }
    }
    (messages, items)
}

fn error_messages(attr: TokenStream, item: TokenStream) -> Vec<String> {
    errors(attr, item).0
}

#[test]
fn snapshot_volatile_only() {
    check(
        quote!(),
        quote! {
            impl Counter {
                #[rpc]
                async fn add(&mut self, by: u64) -> u64 {
                    self.n += by;
                    self.n
                }
                #[rpc]
                async fn reset(&mut self) {
                    self.n = 0;
                }
                fn helper(&self) {}
            }
        },
        expect_file!["snapshots/volatile_only.rs"],
    );
}

#[test]
fn snapshot_persisted_with_primary_key() {
    check(
        quote!(state = persisted),
        quote! {
            impl Account {
                /// Adds `amount`; deduplicated by `transfer_id`.
                #[rpc(persisted, primary_key = transfer_id)]
                async fn deposit(&mut self, transfer_id: u64, amount: i64) -> Result<i64, AccountError> {
                    self.balance += amount;
                    Ok(self.balance)
                }
                #[rpc]
                async fn balance(&self) -> i64 {
                    self.balance
                }
            }
        },
        expect_file!["snapshots/persisted_with_primary_key.rs"],
    );
}

#[test]
fn snapshot_context_argument() {
    check(
        quote!(),
        quote! {
            impl Greeter {
                #[rpc]
                async fn greet(&self, greeting: String, ctx: &EntityContext, times: u8) -> String {
                    format!("{greeting} from {}", ctx.entity_id()).repeat(times as usize)
                }
            }
        },
        expect_file!["snapshots/context_argument.rs"],
    );
}

#[test]
fn snapshot_all_options() {
    check(
        quote!(
            name = "shop.Cart",
            max_idle = "90s",
            mailbox = 4096,
            state = volatile
        ),
        quote! {
            impl Cart {
                #[rpc(persisted)]
                async fn add_item(&mut self, sku: String, quantity: u32) -> Vec<Self> {
                    Vec::new()
                }
                #[cfg(feature = "audit")]
                #[rpc]
                async fn audit(&self) -> Result<(), String> {
                    Ok(())
                }
            }
        },
        expect_file!["snapshots/all_options.rs"],
    );
}

#[test]
fn the_user_block_is_kept_without_rpc_attributes_even_on_error() {
    let (messages, items) = errors(
        quote!(mailbox = 0),
        quote! {
            impl Account {
                #[rpc]
                fn balance(&self) -> i64 { 0 }
                #[inline]
                fn helper(&self) {}
            }
        },
    );
    assert_eq!(messages.len(), 2, "{messages:?}");
    let [Item::Impl(block)] = items.as_slice() else {
        panic!("only the user's block is emitted: {items:?}")
    };
    let text = quote!(#block).to_string();
    assert!(!text.contains("rpc"), "{text}");
    assert!(text.contains("inline"), "{text}");
}

#[test]
fn every_signature_problem_is_reported() {
    let messages = error_messages(
        quote!(),
        quote! {
            impl Account {
                #[rpc]
                fn not_async(&self) {}
                #[rpc]
                async fn by_value(self) {}
                #[rpc]
                async fn no_receiver() {}
                #[rpc]
                async fn generic<T>(&self, value: T) {}
                #[rpc]
                async fn pattern(&self, (a, b): (u8, u8)) {}
                #[rpc]
                async fn borrowed(&self, name: &str) -> &str { "" }
            }
        },
    );
    let expected = [
        "rpc `not_async` must be an `async fn`",
        "rpc `by_value` takes `self` by value",
        "rpc `no_receiver` needs a `&self` or `&mut self` receiver",
        "rpc `generic` cannot be generic",
        "rpc arguments need a plain name",
        "argument `name` is a reference",
        "the return type is a reference",
    ];
    assert_eq!(messages.len(), expected.len(), "{messages:#?}");
    for (message, start) in messages.iter().zip(expected) {
        assert!(
            message.starts_with(start),
            "{message:?} should start with {start:?}"
        );
    }
}

#[test]
fn primary_key_is_checked() {
    let messages = error_messages(
        quote!(),
        quote! {
            impl Account {
                #[rpc(persisted, primary_key = id)]
                async fn missing(&self, transfer_id: u64) {}
                #[rpc(primary_key = transfer_id)]
                async fn volatile(&self, transfer_id: u64) {}
            }
        },
    );
    assert_eq!(
        messages,
        [
            "`primary_key` names `id`, which is not an argument of rpc `missing`; its arguments \
             are `transfer_id`",
            "`primary_key` requires `persisted`: deduplication works on stored messages; write \
             `#[rpc(persisted, primary_key = transfer_id)]`",
        ]
    );
}

#[test]
fn the_impl_block_is_checked() {
    let messages = error_messages(quote!(), quote!(impl Trait for Account { fn f(&self) {} }));
    assert!(messages[0].contains("not on a trait impl"), "{messages:?}");
    let messages = error_messages(
        quote!(),
        quote!(
            impl<T> Account<T> {
                #[rpc]
                async fn f(&self) {}
            }
        ),
    );
    assert!(
        messages[0].starts_with("an entity type cannot be generic"),
        "{messages:?}"
    );
    let messages = error_messages(quote!(), quote!(impl Account { fn helper(&self) {} }));
    assert_eq!(
        messages,
        [
            "an entity needs at least one #[rpc] method: mark an `async fn` of this impl block with `#[rpc]`"
        ]
    );
}

#[test]
fn entity_on_a_struct_or_fn_is_an_error_that_keeps_the_item() {
    let (messages, items) = errors(
        quote!(),
        quote!(
            struct Account {
                balance: i64,
            }
        ),
    );
    assert!(messages[0].starts_with("`#[entity]` goes on the inherent `impl` block"));
    assert!(
        messages[0].ends_with("move `#[entity]` to `impl Account`"),
        "{messages:?}"
    );
    assert!(matches!(items.as_slice(), [Item::Struct(_)]));
    let messages = error_messages(
        quote!(),
        quote!(
            async fn balance() -> i64 {
                0
            }
        ),
    );
    assert!(
        messages[0].contains("a function cannot be an entity"),
        "{messages:?}"
    );
}

#[test]
fn names_that_would_clash_are_rejected() {
    let messages = error_messages(
        quote!(),
        quote! {
            impl Account {
                #[rpc]
                async fn entity_id(&self) {}
                #[rpc]
                async fn get_all(&self) {}
                #[rpc]
                async fn get__all(&self) {}
                #[rpc]
                #[rpc]
                async fn twice(&self) {}
            }
        },
    );
    assert_eq!(messages.len(), 3, "{messages:#?}");
    assert!(messages[0].starts_with("`#[rpc]` set multiple times"));
    assert!(messages[1].starts_with("rpc `entity_id` would clash"));
    assert!(messages[2].starts_with("rpcs `get_all` and `get__all` both become"));
}

#[test]
fn variant_names_are_upper_camel_case() {
    use super::model::variant_ident;
    let cases = [
        ("deposit", "Deposit"),
        ("get_balance", "GetBalance"),
        ("_private", "Private"),
        ("r#type", "Type"),
        ("to_http2", "ToHttp2"),
    ];
    for (method, variant) in cases {
        let ident: syn::Ident = syn::parse_str(method).unwrap();
        assert_eq!(variant_ident(&ident).to_string(), variant);
    }
}

#[test]
fn rpc_attribute_paths_are_recognized() {
    use super::parse::is_rpc_attribute;
    let attrs: Vec<syn::Attribute> = vec![
        syn::parse_quote!(#[rpc]),
        syn::parse_quote!(#[rpc(persisted)]),
        syn::parse_quote!(#[flotilla::rpc]),
        syn::parse_quote!(#[::flotilla::rpc]),
    ];
    assert!(attrs.iter().all(is_rpc_attribute));
    let other: syn::Attribute = syn::parse_quote!(#[other::rpc]);
    assert!(!is_rpc_attribute(&other));
}
