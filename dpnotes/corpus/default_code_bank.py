"""Code-specific phrase banks of the embedded default corpus.

Descriptions are the official ICD-10-CM titles as shipped by `simple_icd_10_cm` (copied here so
that generating a corpus does not load the whole code set; a test checks they still match).
Codes are ordered by how often the generator assigns them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CodeProfile:
    code: str
    description: str
    history: str | None  # how a past history mentions it; None for acute conditions
    symptoms: tuple[str, ...]
    findings: tuple[str, ...]
    medications: tuple[str, ...]
    plans: tuple[str, ...]


CODE_BANK: tuple[CodeProfile, ...] = (
    CodeProfile(
        "I10", "Essential (primary) hypertension", "hypertension",
        ("headache", "blurred vision", "elevated home blood pressure readings"),
        ("blood pressure persistently above 150/90", "mild left ventricular hypertrophy on ECG",
         "no papilledema on fundoscopic exam"),
        ("lisinopril 20 mg daily", "amlodipine 5 mg daily", "hydrochlorothiazide 25 mg daily"),
        ("continue antihypertensive regimen with home blood pressure monitoring", "low sodium diet counselling"),
    ),
    CodeProfile(
        "E78.5", "Hyperlipidemia, unspecified", "hyperlipidemia",
        ("elevated cholesterol on routine screening",),
        ("LDL cholesterol 162 mg/dL", "total cholesterol 248 mg/dL", "xanthelasma of the eyelids"),
        ("atorvastatin 40 mg daily", "rosuvastatin 10 mg daily", "ezetimibe 10 mg daily"),
        ("continue statin and repeat lipid panel in 3 months", "heart-healthy diet reviewed"),
    ),
    CodeProfile(
        "E11.9", "Type 2 diabetes mellitus without complications", "type 2 diabetes",
        ("polyuria", "polydipsia", "fatigue with high fingerstick readings"),
        ("hemoglobin A1c of 7.8%", "fasting glucose 168 mg/dL", "no retinopathy on recent eye exam"),
        ("metformin 1000 mg twice daily", "glipizide 5 mg daily", "empagliflozin 10 mg daily"),
        ("continue oral hypoglycemics and diabetic diet", "fingerstick glucose before meals"),
    ),
    CodeProfile(
        "K21.9", "Gastro-esophageal reflux disease without esophagitis", "GERD",
        ("heartburn after meals", "acid regurgitation", "epigastric burning"),
        ("mild epigastric tenderness", "no esophagitis on prior endoscopy"),
        ("omeprazole 20 mg daily", "pantoprazole 40 mg daily", "famotidine 20 mg at bedtime"),
        ("elevate head of bed and avoid late meals", "continue proton pump inhibitor"),
    ),
    CodeProfile(
        "I25.10", "Atherosclerotic heart disease of native coronary artery without angina pectoris",
        "coronary artery disease",
        ("exertional chest tightness", "chest pressure relieved by rest"),
        ("prior stent to the left anterior descending artery", "troponin negative times three",
         "stress test with a small fixed inferior defect"),
        ("aspirin 81 mg daily", "clopidogrel 75 mg daily", "nitroglycerin 0.4 mg sublingual as needed"),
        ("continue antiplatelet therapy and statin", "cardiac rehabilitation referral"),
    ),
    CodeProfile(
        "E11.65", "Type 2 diabetes mellitus with hyperglycemia", "poorly controlled type 2 diabetes",
        ("blood sugars above 300 at home", "excessive thirst and frequent urination"),
        ("glucose 412 mg/dL on arrival", "hemoglobin A1c of 11.2%", "no anion gap or ketones"),
        ("insulin glargine 20 units at bedtime", "insulin lispro sliding scale with meals"),
        ("insulin teaching completed", "endocrinology follow-up for insulin titration"),
    ),
    CodeProfile(
        "I48.91", "Unspecified atrial fibrillation", "atrial fibrillation",
        ("palpitations", "irregular heartbeat", "lightheadedness"),
        ("irregularly irregular rhythm on ECG", "ventricular rate of 124", "no visible P waves on telemetry"),
        ("apixaban 5 mg twice daily", "metoprolol tartrate 25 mg twice daily", "diltiazem 120 mg daily"),
        ("rate control and anticoagulation, CHA2DS2-VASc reviewed", "cardiology follow-up for rhythm management"),
    ),
    CodeProfile(
        "J44.9", "Chronic obstructive pulmonary disease, unspecified", "COPD",
        ("chronic productive cough", "exertional dyspnea", "wheezing"),
        ("diffuse expiratory wheezes", "hyperinflated lungs on chest x-ray", "FEV1/FVC ratio of 0.62"),
        ("tiotropium inhaler daily", "albuterol inhaler as needed", "fluticasone-salmeterol inhaler twice daily"),
        ("pulmonary rehabilitation referral", "smoking cessation counselling"),
    ),
    CodeProfile(
        "I50.9", "Heart failure, unspecified", "heart failure",
        ("shortness of breath on exertion", "orthopnea", "bilateral leg swelling"),
        ("jugular venous distension", "BNP 1,240 pg/mL", "ejection fraction of 35% on echocardiogram",
         "bibasilar crackles"),
        ("furosemide 40 mg twice daily", "carvedilol 12.5 mg twice daily", "spironolactone 25 mg daily"),
        ("daily weights and 2 g sodium restriction", "fluid restriction to 1.5 L per day"),
    ),
    CodeProfile(
        "N18.30", "Chronic kidney disease, stage 3 unspecified", "chronic kidney disease",
        ("decreased urine output", "generalized fatigue", "ankle swelling"),
        ("creatinine 1.9 mg/dL", "eGFR 42 mL/min", "small echogenic kidneys on renal ultrasound"),
        ("sodium bicarbonate 650 mg twice daily", "calcitriol 0.25 mcg daily"),
        ("avoid nephrotoxic agents and NSAIDs", "renally dose medications and nephrology follow-up"),
    ),
    CodeProfile(
        "E03.9", "Hypothyroidism, unspecified", "hypothyroidism",
        ("cold intolerance", "weight gain", "constipation and fatigue"),
        ("TSH 9.8 mIU/L", "low free T4", "dry skin and delayed reflexes"),
        ("levothyroxine 75 mcg daily", "levothyroxine 50 mcg daily"),
        ("recheck TSH in 6 weeks", "take levothyroxine on an empty stomach"),
    ),
    CodeProfile(
        "F32.A", "Depression, unspecified", "depression",
        ("low mood", "anhedonia", "poor sleep and low energy"),
        ("PHQ-9 score of 16", "flat affect on mental status exam", "denies suicidal ideation"),
        ("sertraline 50 mg daily", "escitalopram 10 mg daily", "bupropion 150 mg daily"),
        ("outpatient psychiatry referral", "safety plan reviewed with patient"),
    ),
    CodeProfile(
        "J18.9", "Pneumonia, unspecified organism", None,
        ("fever and chills", "productive cough with yellow sputum", "pleuritic chest pain"),
        ("right lower lobe consolidation on chest x-ray", "crackles at the right base",
         "white blood cell count 15.2"),
        ("ceftriaxone 1 g IV daily", "azithromycin 500 mg daily", "amoxicillin-clavulanate 875 mg twice daily"),
        ("complete a 5-day course of antibiotics", "incentive spirometry and repeat chest x-ray in 6 weeks"),
    ),
    CodeProfile(
        "N39.0", "Urinary tract infection, site not specified", None,
        ("dysuria", "urinary frequency and urgency", "suprapubic pain"),
        ("urinalysis positive for leukocyte esterase and nitrites", "urine culture growing E. coli"),
        ("nitrofurantoin 100 mg twice daily", "cephalexin 500 mg twice daily"),
        ("complete antibiotic course and encourage oral fluids", "follow up urine culture sensitivities"),
    ),
    CodeProfile(
        "D64.9", "Anemia, unspecified", "anemia",
        ("fatigue", "dizziness on standing", "pallor"),
        ("hemoglobin 8.4 g/dL", "normocytic red cell indices", "conjunctival pallor"),
        ("ferrous sulfate 325 mg daily", "folic acid 1 mg daily"),
        ("repeat CBC in 2 weeks", "outpatient workup for anemia"),
    ),
    CodeProfile(
        "M54.50", "Low back pain, unspecified", "chronic low back pain",
        ("low back pain", "pain worse with bending", "stiffness in the lower back"),
        ("lumbar paraspinal tenderness", "negative straight leg raise", "lumbar spine x-ray without fracture"),
        ("naproxen 500 mg twice daily", "cyclobenzaprine 5 mg at bedtime", "lidocaine patch daily"),
        ("physical therapy referral", "heat and activity as tolerated"),
    ),
    CodeProfile(
        "G47.33", "Obstructive sleep apnea (adult) (pediatric)", "obstructive sleep apnea",
        ("loud snoring", "daytime sleepiness", "witnessed apneas"),
        ("apnea-hypopnea index of 28 on sleep study", "large neck circumference", "nocturnal oxygen desaturation"),
        ("CPAP at 10 cm H2O nightly",),
        ("continue CPAP nightly", "sleep medicine follow-up"),
    ),
    CodeProfile(
        "J45.909", "Unspecified asthma, uncomplicated", "asthma",
        ("wheezing", "chest tightness", "night-time cough"),
        ("scattered wheezes", "peak flow 65% of predicted", "improved with nebulized bronchodilators"),
        ("budesonide-formoterol inhaler twice daily", "montelukast 10 mg daily", "albuterol inhaler as needed"),
        ("asthma action plan reviewed", "avoid known triggers"),
    ),
    CodeProfile(
        "F41.9", "Anxiety disorder, unspecified", "anxiety",
        ("excessive worry", "restlessness", "difficulty concentrating"),
        ("GAD-7 score of 14", "anxious affect", "palpitations resolved with reassurance"),
        ("buspirone 10 mg twice daily", "hydroxyzine 25 mg as needed", "sertraline 50 mg daily"),
        ("referral for cognitive behavioral therapy", "relaxation techniques discussed"),
    ),
    CodeProfile(
        "M17.9", "Osteoarthritis of knee, unspecified", "knee osteoarthritis",
        ("knee pain with walking", "morning knee stiffness", "knee swelling"),
        ("crepitus of the knee", "joint space narrowing on knee x-ray", "reduced knee range of motion"),
        ("acetaminophen 1 g three times daily", "topical diclofenac gel", "meloxicam 7.5 mg daily"),
        ("physical therapy for quadriceps strengthening", "orthopedic referral to discuss knee injection"),
    ),
    CodeProfile(
        "A41.9", "Sepsis, unspecified organism", None,
        ("fever and rigors", "confusion", "low blood pressure"),
        ("lactate 4.1 mmol/L", "heart rate 122 meeting SIRS criteria",
         "fluid resuscitation with 30 mL/kg crystalloid"),
        ("piperacillin-tazobactam 4.5 g IV every 8 hours", "vancomycin IV per pharmacy"),
        ("narrow antibiotics to culture results", "repeat lactate and blood cultures"),
    ),
)
