use std::fs;
use std::path::Path;

use super::text::{one_edit_apart, stem, tokenize};
use super::*;

fn example() -> KnowledgeBase {
    KnowledgeBase::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("knowledge")).unwrap()
}

fn inline(name: &str, markdown: &str) -> Result<KnowledgeBase, KnowledgeError> {
    KnowledgeBase::from_markdown(&[(name.to_string(), markdown.to_string())])
}

fn found(kb: &KnowledgeBase, query: &str) -> Answer {
    match kb.answer(query, "es") {
        Reply::Found(answer) => answer,
        Reply::NotFound { text } => panic!("{query:?} not found: {text}"),
    }
}

fn best_score(kb: &KnowledgeBase, query: &str) -> f32 {
    kb.search(query, 1).first().map_or(0.0, |a| a.score)
}

const UNRELATED: &[&str] = &[
    "¿quién ganó el partido de fútbol ayer?",
    "quien gano el partido de futbol ayer",
    "what is the capital of France",
    "cuál es la receta de la paella",
    "el portal",
    "hola",
];

/// Recognised-speech queries: no accents or punctuation, other wordings.
const ASR: &[(&str, &str)] = &[
    ("como me matriculo", "¿Cómo hago la matrícula?"),
    (
        "hola buenas tardes queria saber como me matriculo",
        "¿Cómo hago la matrícula?",
    ),
    (
        "cuando abre la biblioteca",
        "¿Cuál es el horario de la biblioteca?",
    ),
    (
        "horario de la bibloteca",
        "¿Cuál es el horario de la biblioteca?",
    ),
    (
        "olvide mi contrasena del portal",
        "¿Cómo restablezco la contraseña del portal del estudiante?",
    ),
    (
        "necesito una constancia de estudios",
        "¿Cómo pido una constancia o certificado de estudios?",
    ),
    ("quiero renovar un libro", "¿Cómo renuevo un préstamo?"),
    (
        "que papeles piden para la matricula",
        "¿Qué documentos necesito para matricularme?",
    ),
    (
        "se me paso el plazo de matricula",
        "¿Puedo matricularme fuera de plazo?",
    ),
    (
        "como pido prestados libros",
        "¿Cómo pido un libro prestado?",
    ),
    ("perdi el carnet", "¿Cómo obtengo el carnet de estudiante?"),
    ("hay becas para estudiantes", "¿Cómo solicito una beca?"),
    (
        "quiero reservar una sala para estudiar",
        "¿Hay wifi y salas de estudio en la biblioteca?",
    ),
    (
        "con quien hablo de un problema tecnico",
        "¿Cómo contacto con la mesa de ayuda?",
    ),
    (
        "quiero dar de baja una materia",
        "¿Puedo cambiar o retirar un curso?",
    ),
];

#[test]
fn example_base_loads_in_file_order() {
    let kb = example();
    assert!(
        (12..=16).contains(&kb.entries().len()),
        "{}",
        kb.entries().len()
    );
    let mut sources: Vec<&str> = kb.entries().iter().map(|e| e.source.as_str()).collect();
    sources.dedup();
    assert_eq!(
        sources,
        ["01-matricula.md", "02-biblioteca.md", "03-servicios.md"]
    );
    for entry in kb.entries() {
        assert!(
            !entry.answer.contains(['*', '`', '[', '>', '#']),
            "{}",
            entry.answer
        );
        assert!(!entry.answer.contains("EJEMPLO"), "{}", entry.answer);
    }
}

#[test]
fn each_question_retrieves_itself_first() {
    let kb = example();
    for (index, entry) in kb.entries().iter().enumerate() {
        let hits = kb.search(&entry.question, 3);
        assert_eq!(hits[0].entry_index, index, "{}: {hits:?}", entry.question);
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        assert_eq!(found(&kb, &entry.question).text, entry.answer);
    }
    assert_eq!(kb.search("biblioteca", 2).len(), 2);
    assert!(kb.search("biblioteca", 0).is_empty());
    assert!(kb.search("", 5).is_empty());
}

#[test]
fn asr_like_queries_find_the_right_entry() {
    let kb = example();
    for (query, question) in ASR {
        assert_eq!(found(&kb, query).question, *question, "query {query:?}");
    }
}

#[test]
fn threshold_separates_matched_from_unrelated() {
    let kb = example();
    let lowest = ASR
        .iter()
        .map(|(q, _)| best_score(&kb, q))
        .fold(f32::MAX, f32::min);
    let highest = UNRELATED
        .iter()
        .map(|q| best_score(&kb, q))
        .fold(0.0, f32::max);
    assert!(lowest >= MIN_SCORE, "lowest matched score {lowest}");
    assert!(highest < MIN_SCORE, "highest unrelated score {highest}");
}

#[test]
fn tokens_fold_case_accents_stop_words_and_plurals() {
    assert_eq!(tokenize("MATRÍCULA"), tokenize("matricula"));
    assert_eq!(tokenize("MATRÍCULA"), ["matricula"]);
    assert!(tokenize("¿Cuándo? ¿Dónde? ¿Cuánto?").is_empty());
    assert_eq!(tokenize("contraseña"), ["contrasena"]);
    assert_eq!(tokenize("¿Dónde está la Biblioteca?"), ["biblioteca"]);
    assert_eq!(tokenize("What are the library hours"), ["library", "hour"]);
    let words = [
        "libros", "clases", "papeles", "ciudades", "mes", "class", "classes",
    ];
    let stems: Vec<String> = words.iter().map(|w| stem(w)).collect();
    assert_eq!(
        stems,
        [
            "libro", "clase", "papel", "ciudad", "mes", "class", "classe"
        ]
    );
    assert_eq!(stem("estudiantes"), stem("estudiante"));
}

#[test]
fn near_matches_cover_small_recognition_errors() {
    let c = |s: &str| s.chars().collect::<Vec<_>>();
    assert!(one_edit_apart(&c("matriculo"), &c("matricula")));
    assert!(one_edit_apart(&c("bibloteca"), &c("biblioteca")));
    assert!(!one_edit_apart(&c("matriculo"), &c("matricularme")));
    assert!(!one_edit_apart(&c("xatricula"), &c("matricula")));
    let kb = example();
    assert_eq!(
        kb.index.near_term("bibloteca").map(String::as_str),
        Some("biblioteca")
    );
    assert_eq!(
        kb.index.near_term("matriculo").map(String::as_str),
        Some("matricula")
    );
    assert_eq!(kb.index.near_term("futbol"), None);
    assert_eq!(kb.index.near_term("pase"), None);
}

/// One distinctive word is not enough when the question is about
/// something else.
#[test]
fn a_single_shared_word_does_not_make_an_answer() {
    let kb = example();
    for query in [
        "que tiempo hara manana",
        "a que hora juega el real madrid",
        "quiero comprar un libro de cocina",
    ] {
        assert!(
            matches!(kb.answer(query, "es"), Reply::NotFound { .. }),
            "{query}"
        );
    }
}

/// What Whisper base actually heard from eSpeak questions (rough, but
/// still about the right topic) is answered.
#[test]
fn rough_recognised_questions_are_answered() {
    let kb = example();
    for (heard, topic) in [
        ("Como podemos renovar un libro prestado.", "renov"),
        ("¿Cuál es el olyón de la biblioteca?", "biblioteca"),
        (
            "Olíne la contraseña del portal del estudiante, que hago.",
            "contraseña",
        ),
        ("Donde pimo a constancia me estúlios.", "constancia"),
        ("¿Cómo tengo el carne de estudiante?", "carn"),
        ("que macumentos necesito para la matrícula.", "matr"),
    ] {
        let Reply::Found(answer) = kb.answer(heard, "es") else {
            panic!("not found: {heard}");
        };
        let entry = &kb.entries()[answer.entry_index];
        let text = format!("{} {}", entry.question, entry.answer).to_lowercase();
        assert!(text.contains(topic), "{heard} -> {}", entry.question);
    }
}

#[test]
fn unrelated_questions_are_not_found_in_the_callers_language() {
    let kb = example();
    let topics = kb.topics(3).join("; ");
    assert_eq!(kb.topics(3)[0], "Cómo hago la matrícula");
    assert_eq!(kb.topics(100).len(), kb.entries().len());
    let es = format!("No tengo información sobre eso. Puedo ayudarte con temas como: {topics}.");
    let en =
        format!("I don't have information about that. I can help with topics such as: {topics}.");
    for query in UNRELATED {
        assert_eq!(
            kb.answer(query, "es-ES"),
            Reply::NotFound { text: es.clone() }
        );
        assert_eq!(kb.answer(query, "en"), Reply::NotFound { text: en.clone() });
    }
}

#[test]
fn markdown_is_stripped_for_speech() {
    let md = "# Título\nTexto ignorado.\n\n## ¿Qué traigo?\nTrae **tu carnet** y *una foto*\n\
              al mostrador.\n\nLista:\n- Un `formulario` firmado\n\
              * El [recibo de pago](https://example.invalid/pago)\n1. Una copia_extra\n\nFin";
    let kb = inline("a.md", md).unwrap();
    let expected = "Trae tu carnet y una foto al mostrador. Lista: Un formulario firmado. \
                    El recibo de pago. Una copiaextra. Fin.";
    assert_eq!(kb.entries()[0].answer, expected);
}

#[test]
fn alternatives_match_but_are_not_spoken() {
    let md = "## ¿Cómo llego al campus?\n> transporte autobús\nToma la línea indicada.\n\
              ## ¿Dónde está la cafetería?\nEn la planta baja.\n\
              ## ¿Hay aparcamiento?\nSí, junto al edificio norte.\n\
              ## ¿Hay casilleros?\nSí, en el pasillo central.";
    let kb = inline("a.md", md).unwrap();
    let answer = found(&kb, "que autobus de transporte tomo");
    assert_eq!(
        (answer.entry_index, answer.text.as_str()),
        (0, "Toma la línea indicada.")
    );
    assert_eq!(found(&kb, "cafeteria").entry_index, 1);
}

#[test]
fn empty_answer_or_heading_names_file_and_line() {
    let md = "# T\n\n## Uno\nRespuesta.\n\n## Vacía\n> otra forma\n\n## Tres\nTexto.";
    let err = inline("x.md", md).err().unwrap();
    assert!(matches!(err, KnowledgeError::EmptyAnswer { ref file, line: 6 } if file == "x.md"));
    assert_eq!(err.to_string(), "question heading without answer in x.md:6");
    let err = inline("y.md", "## Uno\nRespuesta.\n##\nTexto.")
        .err()
        .unwrap();
    assert_eq!(err.to_string(), "empty question heading in y.md:3");
    let err = inline("z.md", "# Solo título\nSin entradas.")
        .err()
        .unwrap();
    assert!(matches!(err, KnowledgeError::NoEntries { .. }), "{err}");
}

#[test]
fn load_sorts_md_files_and_errors_name_the_path() {
    let dir = std::env::temp_dir().join(format!("knowledge-test-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let err = KnowledgeBase::load(&dir).err().unwrap();
    assert!(matches!(err, KnowledgeError::NoEntries { .. }), "{err}");
    assert!(
        err.to_string().contains(&dir.display().to_string()),
        "{err}"
    );
    let missing = dir.join("missing");
    let err = KnowledgeBase::load(&missing).err().unwrap();
    assert!(matches!(err, KnowledgeError::ReadDir { .. }), "{err}");
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );

    fs::write(dir.join("b.md"), "## B\nSegunda.").unwrap();
    fs::write(dir.join("a.md"), "## A\nPrimera.").unwrap();
    fs::write(dir.join("c.txt"), "## C\nIgnorada.").unwrap();
    let kb = KnowledgeBase::load(&dir).unwrap();
    let sources: Vec<&str> = kb.entries().iter().map(|e| e.source.as_str()).collect();
    assert_eq!(sources, ["a.md", "b.md"]);

    fs::write(dir.join("c.md"), [0xff, 0xfe]).unwrap();
    let err = KnowledgeBase::load(&dir).err().unwrap();
    assert!(matches!(err, KnowledgeError::ReadFile { .. }), "{err}");
    assert!(err.to_string().contains("c.md"), "{err}");
    fs::write(dir.join("c.md"), "## Pregunta\n\n## Otra\nTexto.").unwrap();
    let err = KnowledgeBase::load(&dir).err().unwrap();
    assert!(err.to_string().ends_with("c.md:1"), "{err}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn as_context_respects_max_bytes() {
    let kb = example();
    let first = &kb.entries()[0];
    let block = format!("Q: {}\nA: {}\n\n", first.question, first.answer);
    assert_eq!(kb.as_context(0), "");
    assert_eq!(kb.as_context(block.len() - 1), "");
    assert_eq!(kb.as_context(block.len()), block);
    for max in [50, 300, 1000, 2000] {
        assert!(kb.as_context(max).len() <= max);
    }
    let all = kb.as_context(usize::MAX);
    assert_eq!(all.matches("Q: ").count(), kb.entries().len());
}

#[test]
fn the_example_bases_words_come_back_from_near_misses_and_right_words_stay() {
    let kb = example();
    let lexicon = Lexicon::new(&kb, "");
    // What Whisper base wrote for eSpeak's questions.
    for (heard, meant) in [
        (
            "Quiero saber el horario de la rilioteca.",
            "Quiero saber el horario de la biblioteca.",
        ),
        (
            "Donde pimo a constancia me estúlios.",
            "Donde pimo a constancia me estudios.",
        ),
        ("¿Cómo hago la matrigula?", "¿Cómo hago la matrícula?"),
    ] {
        assert_eq!(
            lexicon.correct(heard).map(|(text, _)| text).as_deref(),
            Some(meant),
            "{heard}"
        );
    }
    // Other forms of the base's words are not misses.
    assert_eq!(lexicon.correct("¿Cómo me matriculo en un curso?"), None);
    // Every wording the base was written with is left as it is, and so
    // are its answers and unrelated questions.
    let untouched = kb
        .phrasings
        .iter()
        .chain(kb.entries.iter().map(|e| &e.answer))
        .map(String::as_str)
        .chain(UNRELATED.iter().copied());
    for text in untouched {
        assert_eq!(lexicon.correct(text), None, "{text}");
    }
}

#[test]
fn the_recogniser_prompt_is_whole_questions_in_order_within_the_budget() {
    let kb = example();
    let all = kb.questions_text(10_000);
    assert!(
        all.starts_with("¿Cómo hago la matrícula? ¿Cuándo son"),
        "{all}"
    );
    assert!(
        all.ends_with("¿Cómo contacto con la mesa de ayuda?"),
        "{all}"
    );
    let some = kb.questions_text(80);
    assert!(some.len() <= 80 && !some.is_empty(), "{some}");
    assert!(all.starts_with(&some) && some.ends_with('?'), "{some}");
    assert_eq!(kb.questions_text(5), "");
}
