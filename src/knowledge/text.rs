//! Text analysis: folding, stop words, plural stemming and edit distance,
//! shared by the index and the answer policy.

use std::collections::HashSet;
use std::sync::LazyLock;

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// Spanish function words and conversational fillers, without accents
/// (tokens are folded before the look-up).
const STOP_ES: &str = "a al algo alguien algun alguna alguno algunos alli ante aqui asi aunque \
    bajo bien bueno buenas buenos cada como con contra cual cuales cuando cuanta cuantas cuanto \
    cuantos de debe deben debes debo decir del desde dias dime donde durante e el ella ellas \
    ellos en entonces entre era eran eres es esa esas ese eso esos esta estan estar estas este \
    esto estos estoy favor fue fueron gracias ha haber habia hace hacen hacer haces hacia hago \
    han has hasta hay he hemos hola ir la las le les lo los mas me mi mis mucho muy nada nadie \
    necesita necesitas necesito ni no noches nos nosotros nuestra nuestro o ok oye os otra otro \
    para pero poco podria por porque pregunta preguntar pues puede pueden puedes puedo que \
    queria quiere quiero quien quienes quisiera saber se sea segun ser si sido sin sino sobre \
    solo somos son soy su sus tambien tardes te tener tengo tiene tienen tienes todo todos tras \
    tu tus u un una unas uno unos usted ustedes va vale van vas voy y ya yo";

/// English function words.
const STOP_EN: &str = "about after all also am an and any are as at be been before being \
    between but by can could did do does during each for from get had has have he hello her \
    here hey hi him his how i if in into is it its just know like may me might more most must \
    my need not of ok okay on only or other our please shall she should so some such tell than \
    thank thanks that the their them then there these they this those through to too under us \
    very want was we were what when where which who whom whose why will with would yes you your";

static STOP_WORDS: LazyLock<HashSet<&'static str>> = LazyLock::new(|| {
    STOP_ES
        .split_whitespace()
        .chain(STOP_EN.split_whitespace())
        .collect()
});

/// Lowercase without accents: `Matrícula` → `matricula`.
pub(super) fn fold(text: &str) -> String {
    text.nfd()
        .filter(|c| !is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .collect()
}

/// Whether a folded word is a Spanish or English stop word.
pub(super) fn is_stop_word(folded: &str) -> bool {
    STOP_WORDS.contains(folded)
}

/// The runs of letters and digits of `text`, as written.
pub(super) fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
}

/// Lowercases, folds accents, splits on non-alphanumerics, drops stop words and
/// strips plural endings.
pub(super) fn tokenize(text: &str) -> Vec<String> {
    let folded = fold(text);
    words(&folded)
        .filter(|t| !STOP_WORDS.contains(t))
        .map(stem)
        .collect()
}

/// Light plural stemmer for tokens longer than 4 characters: `-es` goes after
/// the consonants that take it in Spanish (`papeles`, `ciudades`), otherwise a
/// single trailing `s` goes (`libros`, `clases`, `books`).
pub(super) fn stem(token: &str) -> String {
    let chars: Vec<char> = token.chars().collect();
    let n = chars.len();
    if n <= 4 || chars[n - 1] != 's' {
        return token.to_string();
    }
    if chars[n - 2] == 'e' && matches!(chars[n - 3], 'l' | 'n' | 'r' | 'd' | 'z' | 'j') {
        return chars[..n - 2].iter().collect();
    }
    if chars[n - 2] == 's' {
        return token.to_string();
    }
    chars[..n - 1].iter().collect()
}

/// Whether two words that share their first letter differ by one edit
/// (substitution, insertion or deletion).
pub(super) fn one_edit_apart(a: &[char], b: &[char]) -> bool {
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    if long.len() - short.len() > 1 || short.first() != long.first() {
        return false;
    }
    let prefix = short.iter().zip(long).take_while(|(x, y)| x == y).count();
    if prefix == short.len() {
        return true;
    }
    if short.len() == long.len() {
        short[prefix + 1..] == long[prefix + 1..]
    } else {
        short[prefix..] == long[prefix + 1..]
    }
}
