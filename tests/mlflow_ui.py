"""The MLflow 3.17 UI in headless Chromium (Selenium, Debian's chromium + chromedriver; nothing is
downloaded): open a registered model's page and move an alias with the UI's own alias editor,
as a person rolling back does. Used by tests/test_registry_serving_e2e.py."""

from __future__ import annotations

from pathlib import Path

# The editor's elements by MLflow's own component ids (stable across its styling changes).
ADD_BUTTON = "//button[contains(@data-component-id, 'modelversiontablealiasescell')]"
ALIAS_INPUT = "//div[@role='dialog']//input[@role='combobox']"
SAVE = "//button[@data-component-id='mlflow.edit-aliases-modal.save-button']"


def move_alias_in_ui(
    ui_url: str,
    model: str,
    alias: str,
    version: int,
    screenshots: Path,
    chromium: str,
    chromedriver: str,
    timeout_s: float = 60.0,
) -> None:
    """Model page → the version's Aliases cell → type `alias` → Save; waits until the page
    shows the alias on that version. Screenshots: the editor, then the page afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    screenshots.mkdir(parents=True, exist_ok=True)
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    wait = WebDriverWait(driver, timeout_s)
    row = f"//div[@role='row'][.//a[@href='#/models/{model}/versions/{version}']]"
    try:
        driver.get(f"{ui_url}/#/models/{model}")
        wait.until(ec.element_to_be_clickable((By.XPATH, row + ADD_BUTTON))).click()
        box = wait.until(ec.element_to_be_clickable((By.XPATH, ALIAS_INPUT)))
        box.send_keys(alias)
        box.send_keys(Keys.ENTER)
        driver.save_screenshot(str(screenshots / f"{alias}-editor.png"))
        wait.until(ec.element_to_be_clickable((By.XPATH, SAVE))).click()
        wait.until(ec.invisibility_of_element_located((By.XPATH, SAVE)))
        # The table is not refetched after the save: load the page again, as a person would.
        driver.get(f"{ui_url}/#/models/{model}")
        driver.refresh()
        tag = f"{row}//*[@data-component-type='tag' and @title='{alias}']"
        wait.until(ec.presence_of_element_located((By.XPATH, tag)))
        driver.save_screenshot(str(screenshots / f"{alias}-moved.png"))
    except Exception:
        driver.save_screenshot(str(screenshots / f"{alias}-failed.png"))
        raise
    finally:
        driver.quit()
