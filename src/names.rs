//! Enums whose values have stable names: one declaration gives the variants,
//! their names, `ALL` in declaration order, `as_str`, and the same names for
//! serde, so that no list is kept in sync by hand.

/// Declares a fieldless enum from `Variant = "name",` lines. It derives
/// `Debug`, `Clone`, `Copy`, `PartialEq`, `Eq` and `serde::Serialize` (as the
/// name) and `Display` (the name); `ALL` lists every value in order and
/// `as_str` gives the name.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$variant_meta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        $vis enum $name {
            $( $(#[$variant_meta])* #[serde(rename = $text)] $variant, )+
        }

        impl $name {
            /// Every value, in declaration order.
            $vis const ALL: [Self; [$($text),+].len()] = [$(Self::$variant),+];

            /// The value's stable name, as serialized.
            $vis const fn as_str(self) -> &'static str {
                match self {
                    $( Self::$variant => $text, )+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pub(crate) use named_enum;

#[cfg(test)]
mod tests {
    named_enum! {
        /// A test enum.
        enum Colour {
            Red = "red",
            DarkBlue = "dark_blue",
        }
    }

    #[test]
    fn names_list_and_serialize_alike() {
        assert_eq!(Colour::ALL, [Colour::Red, Colour::DarkBlue]);
        for colour in Colour::ALL {
            let json = serde_json::to_value(colour).expect("serializes");
            assert_eq!(json, colour.as_str());
        }
        assert_eq!(Colour::DarkBlue.to_string(), "dark_blue");
    }
}
