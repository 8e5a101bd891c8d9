//! Small built-in terminology and name lists.
//!
//! Codes are real LOINC / SNOMED CT / RxNorm / CVX codes with their usual
//! display text (mostly as Synthea emits them), so the output looks like
//! real-world data to anything that inspects codings.

pub(crate) const LOINC: &str = "http://loinc.org";
pub(crate) const SNOMED: &str = "http://snomed.info/sct";
pub(crate) const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
pub(crate) const CVX: &str = "http://hl7.org/fhir/sid/cvx";

#[derive(Clone, Copy)]
pub(crate) struct Code {
    pub code: &'static str,
    pub display: &'static str,
}

const fn c(code: &'static str, display: &'static str) -> Code {
    Code { code, display }
}

// ---- Encounters -----------------------------------------------------------

pub(crate) const ENC_WELL_CHILD: Code = c("410620009", "Well child visit (procedure)");
pub(crate) const ENC_GENERAL_EXAM: Code =
    c("162673000", "General examination of patient (procedure)");
pub(crate) const ENC_SYMPTOM: Code = c("185345009", "Encounter for symptom (procedure)");
pub(crate) const ENC_FOLLOW_UP: Code = c("390906007", "Follow-up encounter (procedure)");
pub(crate) const ENC_EMERGENCY: Code = c("50849002", "Emergency room admission (procedure)");
pub(crate) const ENC_INPATIENT: Code = c("32485007", "Hospital admission (procedure)");

// ---- Observations (LOINC) -------------------------------------------------

pub(crate) const OBS_HEIGHT: Code = c("8302-2", "Body Height");
pub(crate) const OBS_WEIGHT: Code = c("29463-7", "Body Weight");
pub(crate) const OBS_BMI: Code = c("39156-5", "Body Mass Index");
pub(crate) const OBS_BP: Code = c("85354-9", "Blood pressure panel with all children optional");
pub(crate) const OBS_SYSTOLIC: Code = c("8480-6", "Systolic Blood Pressure");
pub(crate) const OBS_DIASTOLIC: Code = c("8462-4", "Diastolic Blood Pressure");
pub(crate) const OBS_HEART_RATE: Code = c("8867-4", "Heart rate");
pub(crate) const OBS_RESP_RATE: Code = c("9279-1", "Respiratory rate");
pub(crate) const OBS_TEMP: Code = c("8310-5", "Body temperature");
pub(crate) const OBS_SPO2: Code = c(
    "59408-5",
    "Oxygen saturation in Arterial blood by Pulse oximetry",
);
pub(crate) const OBS_PAIN: Code = c(
    "72514-3",
    "Pain severity - 0-10 verbal numeric rating [Score] - Reported",
);
pub(crate) const OBS_SMOKING: Code = c("72166-2", "Tobacco smoking status NHIS");

pub(crate) const SMOKING_STATUS: [Code; 3] = [
    c("266919005", "Never smoker"),
    c("8517006", "Ex-smoker (finding)"),
    c("449868002", "Smokes tobacco daily (finding)"),
];

/// A laboratory analyte: normal range and spread in units of `10^-scale`.
#[derive(Clone, Copy)]
pub(crate) struct Lab {
    pub code: Code,
    pub unit: &'static str,
    pub scale: u32,
    pub low: i64,
    pub high: i64,
}

const fn lab(
    code: &'static str,
    display: &'static str,
    unit: &'static str,
    scale: u32,
    low: i64,
    high: i64,
) -> Lab {
    Lab {
        code: c(code, display),
        unit,
        scale,
        low,
        high,
    }
}

pub(crate) struct Panel {
    pub code: Code,
    pub members: &'static [Lab],
}

pub(crate) const PANEL_LIPID: Panel = Panel {
    code: c("57698-3", "Lipid Panel"),
    members: &[
        lab("2093-3", "Total Cholesterol", "mg/dL", 1, 1250, 2000),
        lab("2571-8", "Triglycerides", "mg/dL", 1, 400, 1500),
        lab(
            "18262-6",
            "Low Density Lipoprotein Cholesterol",
            "mg/dL",
            1,
            500,
            1300,
        ),
        lab(
            "2085-9",
            "High Density Lipoprotein Cholesterol",
            "mg/dL",
            1,
            400,
            800,
        ),
    ],
};

pub(crate) const PANEL_CBC: Panel = Panel {
    code: c(
        "58410-2",
        "Complete blood count (hemogram) panel - Blood by Automated count",
    ),
    members: &[
        lab(
            "6690-2",
            "Leukocytes [#/volume] in Blood by Automated count",
            "10*3/uL",
            1,
            40,
            105,
        ),
        lab(
            "789-8",
            "Erythrocytes [#/volume] in Blood by Automated count",
            "10*6/uL",
            2,
            420,
            580,
        ),
        lab(
            "718-7",
            "Hemoglobin [Mass/volume] in Blood",
            "g/dL",
            1,
            120,
            170,
        ),
        lab(
            "4544-3",
            "Hematocrit [Volume Fraction] of Blood by Automated count",
            "%",
            1,
            360,
            500,
        ),
        lab(
            "787-2",
            "MCV [Entitic volume] by Automated count",
            "fL",
            1,
            800,
            1000,
        ),
        lab(
            "785-6",
            "MCH [Entitic mass] by Automated count",
            "pg",
            1,
            270,
            330,
        ),
        lab(
            "786-4",
            "MCHC [Mass/volume] by Automated count",
            "g/dL",
            1,
            320,
            360,
        ),
        lab(
            "777-3",
            "Platelets [#/volume] in Blood by Automated count",
            "10*3/uL",
            0,
            150,
            400,
        ),
    ],
};

pub(crate) const PANEL_BMP: Panel = Panel {
    code: c("51990-0", "Basic metabolic panel - Blood"),
    members: &[
        lab("2339-0", "Glucose", "mg/dL", 1, 700, 990),
        lab("6299-2", "Urea Nitrogen", "mg/dL", 1, 70, 200),
        lab("38483-4", "Creatinine", "mg/dL", 2, 60, 130),
        lab("49765-1", "Calcium", "mg/dL", 1, 85, 102),
        lab("2947-0", "Sodium", "mmol/L", 1, 1360, 1450),
        lab("6298-4", "Potassium", "mmol/L", 2, 350, 510),
        lab("2069-3", "Chloride", "mmol/L", 1, 980, 1070),
        lab("20565-8", "Carbon Dioxide", "mmol/L", 1, 220, 290),
    ],
};

pub(crate) const PANEL_A1C: Panel = Panel {
    code: c("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood"),
    members: &[lab(
        "4548-4",
        "Hemoglobin A1c/Hemoglobin.total in Blood",
        "%",
        1,
        40,
        56,
    )],
};

pub(crate) const PANEL_HH: Panel = Panel {
    code: c("24360-0", "Hemoglobin and Hematocrit panel - Blood"),
    members: &[
        lab(
            "718-7",
            "Hemoglobin [Mass/volume] in Blood",
            "g/dL",
            1,
            120,
            170,
        ),
        lab(
            "4544-3",
            "Hematocrit [Volume Fraction] of Blood by Automated count",
            "%",
            1,
            360,
            500,
        ),
    ],
};

/// A qualitative point-of-care test (LOINC) and its SNOMED CT results.
pub(crate) struct RapidTest {
    pub code: Code,
    pub positive: Code,
    pub negative: Code,
}

pub(crate) const TEST_STREP: RapidTest = RapidTest {
    code: c(
        "78012-2",
        "Streptococcus pyogenes Ag [Presence] in Throat by Rapid immunoassay",
    ),
    positive: c("10828004", "Positive (qualifier value)"),
    negative: c("260385009", "Negative (qualifier value)"),
};

pub(crate) const TEST_COVID: RapidTest = RapidTest {
    code: c(
        "94500-6",
        "SARS-CoV-2 (COVID-19) RNA [Presence] in Respiratory specimen by NAA with probe detection",
    ),
    positive: c("260373001", "Detected (qualifier value)"),
    negative: c("260415000", "Not detected (qualifier value)"),
};

// ---- Conditions (SNOMED CT) -----------------------------------------------

pub(crate) const ACUTE_CONDITIONS: [Code; 7] = [
    c("444814009", "Viral sinusitis (disorder)"),
    c("195662009", "Acute viral pharyngitis (disorder)"),
    c("10509002", "Acute bronchitis (disorder)"),
    c("65363002", "Otitis media"),
    c("43878008", "Streptococcal sore throat (disorder)"),
    c("75498004", "Acute bacterial sinusitis (disorder)"),
    c("840539006", "COVID-19"),
];
pub(crate) const COVID_INDEX: usize = 6;

pub(crate) const INJURIES: [Code; 8] = [
    c("283371005", "Laceration of forearm"),
    c("370247008", "Facial laceration"),
    c("44465007", "Sprain of ankle"),
    c("39848009", "Whiplash injury to neck"),
    c("62106007", "Concussion with no loss of consciousness"),
    c("58150001", "Fracture of clavicle"),
    c("65966004", "Fracture of forearm"),
    c("284551006", "Laceration of foot"),
];

/// A long-term condition and the medications used to treat it.
pub(crate) struct Chronic {
    pub code: Code,
    pub meds: &'static [Code],
    pub min_age: i64,
}

pub(crate) const CHRONIC: [Chronic; 8] = [
    Chronic {
        code: c("59621000", "Essential hypertension (disorder)"),
        meds: &[
            c("314076", "lisinopril 10 MG Oral Tablet"),
            c("310798", "Hydrochlorothiazide 25 MG Oral Tablet"),
            c("197361", "amLODIPine 5 MG Oral Tablet"),
        ],
        min_age: 25,
    },
    Chronic {
        code: c("44054006", "Diabetes mellitus type 2 (disorder)"),
        meds: &[c(
            "860975",
            "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet",
        )],
        min_age: 30,
    },
    Chronic {
        code: c("15777000", "Prediabetes"),
        meds: &[],
        min_age: 18,
    },
    Chronic {
        code: c("55822004", "Hyperlipidemia"),
        meds: &[
            c("259255", "atorvastatin 80 MG Oral Tablet"),
            c("312961", "Simvastatin 20 MG Oral Tablet"),
        ],
        min_age: 30,
    },
    Chronic {
        code: c("195967001", "Asthma"),
        meds: &[
            c(
                "895994",
                "120 ACTUAT Fluticasone propionate 0.044 MG/ACTUAT Metered Dose Inhaler",
            ),
            c(
                "745679",
                "200 ACTUAT Albuterol 0.09 MG/ACTUAT Metered Dose Inhaler",
            ),
        ],
        min_age: 2,
    },
    Chronic {
        code: c("162864005", "Body mass index 30+ - obesity (finding)"),
        meds: &[],
        min_age: 18,
    },
    Chronic {
        code: c("271737000", "Anemia (disorder)"),
        meds: &[],
        min_age: 10,
    },
    Chronic {
        code: c("35489007", "Depressive disorder"),
        meds: &[c("312938", "Sertraline 100 MG Oral Tablet")],
        min_age: 14,
    },
];
pub(crate) const HYPERTENSION: usize = 0;
pub(crate) const DIABETES: usize = 1;

// ---- Medications (RxNorm) -------------------------------------------------

pub(crate) const ANTIBIOTICS: [Code; 3] = [
    c("308182", "Amoxicillin 250 MG Oral Capsule"),
    c("308192", "Amoxicillin 500 MG Oral Tablet"),
    c("834061", "Penicillin V Potassium 250 MG Oral Tablet"),
];

pub(crate) const ANALGESICS: [Code; 4] = [
    c("313782", "Acetaminophen 325 MG Oral Tablet"),
    c("310965", "Ibuprofen 200 MG Oral Tablet"),
    c("849574", "Naproxen sodium 220 MG Oral Tablet"),
    c(
        "1049221",
        "Acetaminophen 325 MG / Oxycodone Hydrochloride 5 MG Oral Tablet",
    ),
];

// ---- Procedures (SNOMED CT) -----------------------------------------------

pub(crate) const PROC_WELLNESS: [Code; 5] = [
    c("430193006", "Medication Reconciliation (procedure)"),
    c("171207006", "Depression screening (procedure)"),
    c(
        "710824005",
        "Assessment of health and social care needs (procedure)",
    ),
    c("428211000124100", "Assessment of substance use (procedure)"),
    c(
        "454711000124102",
        "Depression screening using Patient Health Questionnaire Two-Item score (procedure)",
    ),
];
pub(crate) const PROC_COLONOSCOPY: Code = c("73761001", "Colonoscopy");
pub(crate) const PROC_MAMMOGRAPHY: Code = c("71651007", "Mammography (procedure)");
pub(crate) const PROC_MED_RECONCILIATION: Code =
    c("430193006", "Medication Reconciliation (procedure)");

pub(crate) const PROC_SICK: [Code; 3] = [
    c("117015009", "Throat culture (procedure)"),
    c(
        "23426006",
        "Measurement of respiratory function (procedure)",
    ),
    c("112790001", "Nasal sinus endoscopy (procedure)"),
];

pub(crate) const PROC_EMERGENCY: [Code; 4] = [
    c("288086009", "Suture open wound"),
    c("399208008", "Plain chest X-ray (procedure)"),
    c("76601001", "Intramuscular injection"),
    c("1225002", "Upper arm X-ray"),
];

pub(crate) const PROC_INPATIENT: [Code; 8] = [
    c("415070008", "Percutaneous coronary intervention"),
    c("80146002", "Appendectomy"),
    c("38102005", "Cholecystectomy"),
    c("40701008", "Echocardiography (procedure)"),
    c("127783003", "Spirometry (procedure)"),
    c("265764009", "Renal dialysis (procedure)"),
    c("18946005", "Epidural anesthesia"),
    c("232717009", "Coronary artery bypass grafting"),
];

pub(crate) const BODY_SITES: [Code; 4] = [
    c("368209003", "Right arm"),
    c("368208006", "Left upper arm structure"),
    c("61685007", "Lower limb structure"),
    c("774007", "Structure of head and/or neck"),
];

// ---- Immunizations (CVX) --------------------------------------------------

pub(crate) const VAX_INFANT: [Code; 6] = [
    c("08", "Hep B, adolescent or pediatric"),
    c("20", "DTaP"),
    c("10", "IPV"),
    c("49", "Hib (PRP-OMP)"),
    c("133", "Pneumococcal conjugate PCV 13"),
    c("116", "rotavirus, pentavalent"),
];
pub(crate) const VAX_CHILD: [Code; 6] = [
    c("03", "MMR"),
    c("21", "varicella"),
    c("83", "Hep A, ped/adol, 2 dose"),
    c("115", "Tdap"),
    c("62", "HPV, quadrivalent"),
    c("114", "meningococcal MCV4P"),
];
pub(crate) const VAX_FLU: Code = c("140", "Influenza, seasonal, injectable, preservative free");
pub(crate) const VAX_TD: Code = c("113", "Td (adult) preservative free");
pub(crate) const VAX_ZOSTER: Code = c("121", "zoster");
pub(crate) const VAX_PNEUMO: Code = c("33", "pneumococcal polysaccharide vaccine, 23 valent");
pub(crate) const VAX_COVID: Code = c(
    "208",
    "SARS-COV-2 (COVID-19) vaccine, mRNA, spike protein, LNP, preservative free, 30 mcg/0.3mL dose",
);

// ---- Documents (LOINC) ----------------------------------------------------

pub(crate) const DOC_HISTORY: Code = c("34117-2", "History and physical note");
pub(crate) const DOC_PROGRESS: Code = c("11506-3", "Progress note");
pub(crate) const DOC_DISCHARGE: Code = c("18842-5", "Discharge summary");
pub(crate) const DOC_EMERGENCY: Code = c("34111-5", "Emergency department Note");

// ---- Demographics ---------------------------------------------------------

pub(crate) const RACES: [(&str, &str); 5] = [
    ("2106-3", "White"),
    ("2054-5", "Black or African American"),
    ("2028-9", "Asian"),
    ("1002-5", "American Indian or Alaska Native"),
    ("2131-1", "Other Race"),
];
pub(crate) const ETHNICITIES: [(&str, &str); 2] = [
    ("2186-5", "Not Hispanic or Latino"),
    ("2135-2", "Hispanic or Latino"),
];

pub(crate) const LANGUAGES: [(&str, &str); 4] = [
    ("en-US", "English"),
    ("es", "Spanish"),
    ("zh", "Chinese"),
    ("pt", "Portuguese"),
];

pub(crate) const MARITAL: [(&str, &str); 4] = [
    ("M", "Married"),
    ("S", "Never Married"),
    ("D", "Divorced"),
    ("W", "Widowed"),
];

pub(crate) const GIVEN_MALE: [&str; 32] = [
    "Abdul", "Adrian", "Antonio", "Benjamin", "Carlos", "Charles", "Daniel", "David", "Dewey",
    "Edward", "Elias", "Franklin", "George", "Hector", "Isaac", "James", "Jerome", "Jose",
    "Kenneth", "Lamar", "Luis", "Marcus", "Michael", "Nathan", "Omar", "Patrick", "Raymond",
    "Samuel", "Thomas", "Vernon", "William", "Zachary",
];

pub(crate) const GIVEN_FEMALE: [&str; 32] = [
    "Aiko",
    "Alicia",
    "Amelia",
    "Beatriz",
    "Carmen",
    "Chloe",
    "Danielle",
    "Dorothy",
    "Elena",
    "Emily",
    "Fatima",
    "Grace",
    "Hannah",
    "Ines",
    "Jasmine",
    "Julia",
    "Karen",
    "Latoya",
    "Linda",
    "Maria",
    "Megan",
    "Nancy",
    "Olivia",
    "Priya",
    "Rosa",
    "Sharyl",
    "Sofia",
    "Tamika",
    "Valentina",
    "Wendy",
    "Yuki",
    "Zoe",
];

pub(crate) const FAMILY: [&str; 48] = [
    "Abbott",
    "Alvarez",
    "Bailey",
    "Bergstrom",
    "Brown",
    "Chen",
    "Collins",
    "Cruz",
    "Davis",
    "Dietrich",
    "Evans",
    "Fischer",
    "Garcia",
    "Gonzalez",
    "Greenfelder",
    "Hilpert",
    "Ito",
    "Jacobs",
    "Johnson",
    "Kim",
    "Koepp",
    "Kuhlman",
    "Lee",
    "Lopez",
    "Martin",
    "Miller",
    "Moore",
    "Nguyen",
    "O'Connell",
    "Okafor",
    "Patel",
    "Perez",
    "Quigley",
    "Ramirez",
    "Robinson",
    "Schmidt",
    "Silva",
    "Smith",
    "Tanaka",
    "Thompson",
    "Torres",
    "Turner",
    "Walker",
    "Weber",
    "White",
    "Williams",
    "Wilson",
    "Zulauf",
];

pub(crate) const STREETS: [&str; 16] = [
    "Lockman Row",
    "Highland Avenue",
    "Maple Street",
    "Cedar Lane",
    "Harbor Road",
    "Mill Street",
    "Prospect Hill",
    "Elm Court",
    "Washington Street",
    "Pleasant Street",
    "River Drive",
    "Summit Avenue",
    "Chestnut Street",
    "Forest Way",
    "Beacon Street",
    "Union Square",
];

pub(crate) const CITIES: [(&str, &str, i64, i64); 16] = [
    // (city, postal code, latitude 1e-6, longitude 1e-6)
    ("Peabody", "01940", 42_534_202, -70_969_734),
    ("Salem", "01970", 42_519_540, -70_896_715),
    ("Boston", "02108", 42_357_603, -71_062_887),
    ("Cambridge", "02139", 42_365_250, -71_103_950),
    ("Worcester", "01608", 42_262_593, -71_802_293),
    ("Springfield", "01103", 42_101_483, -72_589_811),
    ("Lowell", "01852", 42_633_425, -71_316_172),
    ("Holyoke", "01040", 42_204_259, -72_616_200),
    ("Quincy", "02169", 42_252_877, -71_002_270),
    ("Lynn", "01901", 42_466_763, -70_949_494),
    ("Brockton", "02301", 42_083_433, -71_018_379),
    ("New Bedford", "02740", 41_636_215, -70_934_205),
    ("Framingham", "01702", 42_279_286, -71_416_172),
    ("Pittsfield", "01201", 42_450_085, -73_245_382),
    ("Northampton", "01060", 42_325_092, -72_641_200),
    ("Plymouth", "02360", 41_958_377, -70_667_267),
];

pub(crate) const ORG_PLACES: [&str; 16] = [
    "Riverside",
    "Lakeview",
    "Northgate",
    "Harborview",
    "Pine Hill",
    "Maplewood",
    "Summit",
    "Bay State",
    "Cedar Grove",
    "Fairview",
    "Westfield",
    "Brookside",
    "Hillcrest",
    "Oak Park",
    "Meadowbrook",
    "Eastbridge",
];

pub(crate) const ORG_KINDS: [(&str, &str, &str); 6] = [
    // (name suffix, organization-type code, display)
    ("Medical Center", "prov", "Healthcare Provider"),
    ("Family Practice", "prov", "Healthcare Provider"),
    ("Community Health Center", "prov", "Healthcare Provider"),
    ("General Hospital", "prov", "Healthcare Provider"),
    ("Pediatrics", "prov", "Healthcare Provider"),
    ("Urgent Care", "prov", "Healthcare Provider"),
];

pub(crate) const SPECIALTIES: [(&str, &str); 5] = [
    ("208D00000X", "General Practice"),
    ("207Q00000X", "Family Medicine"),
    ("207R00000X", "Internal Medicine"),
    ("208000000X", "Pediatrics"),
    ("207P00000X", "Emergency Medicine"),
];
