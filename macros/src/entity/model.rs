//! The checked model of one `#[entity]` block, which the expansion works from.

use proc_macro2::Ident;
use quote::format_ident;
use syn::{Attribute, Type, parse_quote};

use crate::options::EntityOptions;

/// One `#[entity]` impl block, checked.
#[derive(Debug)]
pub(crate) struct Entity {
    /// The entity type as written after `impl`.
    pub(crate) self_ty: Type,
    /// Its name: the base of the generated `{Type}Request`, `{Type}Reply`, `{Type}Client`.
    pub(crate) ident: Ident,
    pub(crate) options: EntityOptions,
    pub(crate) rpcs: Vec<Rpc>,
}

/// One `#[rpc]` method.
#[derive(Debug)]
pub(crate) struct Rpc {
    /// The method's name.
    pub(crate) method: Ident,
    /// Its request and reply variant: the method name in UpperCamelCase.
    pub(crate) variant: Ident,
    /// The wire tag: the method name (without `r#`). Stored with persisted messages.
    pub(crate) tag: String,
    /// The arguments that travel in the request, in the user's order.
    pub(crate) args: Vec<Arg>,
    /// Where the `&EntityContext` argument is among the arguments after the
    /// receiver, if the rpc takes one.
    pub(crate) context: Option<usize>,
    pub(crate) output: Output,
    pub(crate) persisted: bool,
    /// The argument named by `primary_key`.
    pub(crate) primary_key: Option<Arg>,
    /// The method's `///` docs, copied onto the client method.
    pub(crate) docs: Vec<Attribute>,
    /// The method's `#[cfg]`s, repeated on every generated piece of this rpc.
    pub(crate) cfgs: Vec<Attribute>,
}

/// An argument that travels in the request, as a named field.
#[derive(Debug, Clone)]
pub(crate) struct Arg {
    pub(crate) name: Ident,
    /// The type, with `Self` replaced by the entity type (the generated items
    /// live outside the impl block).
    pub(crate) ty: Type,
}

/// What an rpc returns.
#[derive(Debug)]
pub(crate) struct Output {
    /// The declared return type; `None` for a method without `->`.
    pub(crate) ty: Option<Type>,
    /// `Some((T, E))` when the return type is `Result<T, E>`: the client then
    /// returns `Result<T, ClusterError<E>>`, else `Result<ty, ClusterError>`.
    pub(crate) result: Option<(Type, Type)>,
}

impl Output {
    /// The type the reply variant holds (`()` for a method without `->`).
    pub(crate) fn reply_type(&self) -> Type {
        self.ty.clone().unwrap_or_else(|| parse_quote!(()))
    }
}

/// `get_balance` becomes `GetBalance`, with the method's span.
pub(crate) fn variant_ident(method: &Ident) -> Ident {
    let camel: String = unraw(method)
        .split('_')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|first| first.to_uppercase().chain(chars).collect::<String>())
                .unwrap_or_default()
        })
        .collect();
    format_ident!("{}", camel, span = method.span())
}

/// The identifier's text without a leading `r#`.
pub(crate) fn unraw(ident: &Ident) -> String {
    let text = ident.to_string();
    text.strip_prefix("r#").map(str::to_owned).unwrap_or(text)
}
